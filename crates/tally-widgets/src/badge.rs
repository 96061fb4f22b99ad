//! The badge: what it shows and how a client may cache it.
//!
//! Image proxies (GitHub's camo above all) cache an image for as long as they are allowed, so a
//! badge that can be cached freezes. Every badge is sent `Cache-Control: no-cache, max-age=0`
//! with a strong `ETag` of its bytes: a proxy asks again every time, and a badge that did not
//! change costs a `304` and no body.

use axum::http::{HeaderMap, HeaderValue, header};
use md5::{Digest as _, Md5};
use serde::Deserialize;
use shields::{BadgeParams, BadgeStyle};

use crate::humanize;

/// The longest label or color a badge takes.
pub const MAX_LABEL_CHARS: usize = 64;
pub const MAX_COLOR_CHARS: usize = 32;

pub const CACHE_CONTROL: &str = "no-cache, max-age=0";

/// How a count is written on a badge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CountFormat {
    /// `1.2k`, `3.4M`: short, rounded down.
    #[default]
    Metric,
    /// `1,234,567`.
    Full,
}

impl CountFormat {
    pub fn write(self, value: i64) -> String {
        match self {
            CountFormat::Metric => humanize::metric(value),
            CountFormat::Full => humanize::full(value),
        }
    }
}

/// What a badge looks like, as its query string says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadgeLook {
    pub label: String,
    pub color: Option<String>,
    pub label_color: Option<String>,
    pub style: BadgeStyle,
    pub format: CountFormat,
}

impl BadgeLook {
    /// Checks the query's look parameters; the error names the one that is wrong.
    pub fn parse(
        label: Option<String>,
        color: Option<String>,
        label_color: Option<String>,
        style: Option<&str>,
        format: Option<CountFormat>,
    ) -> Result<Self, String> {
        let label = label.unwrap_or_else(|| "views".to_owned());
        if label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
            return Err(format!(
                "`label` must be at most {MAX_LABEL_CHARS} characters, none a control character"
            ));
        }
        for (member, color) in [("color", &color), ("labelColor", &label_color)] {
            if let Some(color) = color
                && !is_color(color)
            {
                return Err(format!(
                    "`{member}` must be a color name or hex code: 1 to {MAX_COLOR_CHARS} letters, digits or `#`"
                ));
            }
        }
        let style = match style {
            None => BadgeStyle::Flat,
            Some(style) => style.parse().map_err(|error| format!("`style`: {error}"))?,
        };
        Ok(Self {
            label,
            color,
            label_color,
            style,
            format: format.unwrap_or_default(),
        })
    }

    /// The badge's SVG: valid XML, with a `<title>` and an `aria-label` for screen readers, its
    /// text widths measured from the font, so the text never overflows the badge.
    pub fn render(&self, value: i64) -> String {
        let message = self.format.write(value);
        shields::render_badge_svg(&BadgeParams {
            style: self.style,
            label: Some(&self.label),
            message: Some(&message),
            label_color: self.label_color.as_deref(),
            message_color: Some(self.color.as_deref().unwrap_or("blue")),
            ..BadgeParams::new("", "")
        })
    }

    /// The message color for the shields.io endpoint JSON.
    pub fn color_name(&self) -> &str {
        self.color.as_deref().unwrap_or("blue")
    }
}

fn is_color(color: &str) -> bool {
    (1..=MAX_COLOR_CHARS).contains(&color.len())
        && color
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'#')
}

/// A strong validator of the badge's bytes.
pub fn etag(body: &str) -> HeaderValue {
    let digest = Md5::digest(body.as_bytes());
    let hex: String = digest[..12]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex in quotes is a valid header value")
}

/// Whether the request's `If-None-Match` matches `etag` (weak comparison, as RFC 9110 asks for
/// `If-None-Match`).
pub fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Some(etag) = etag.to_str().ok() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look() -> BadgeLook {
        BadgeLook::parse(None, None, None, None, None).unwrap()
    }

    #[test]
    fn a_badge_is_labelled_for_screen_readers_and_its_text_is_escaped() {
        let svg = look().render(1_234);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("aria-label=\"views: 1.2k\""), "{svg}");
        assert!(svg.contains("<title>views: 1.2k</title>"), "{svg}");
        let odd = BadgeLook::parse(Some("<&\"'>".into()), None, None, None, None).unwrap();
        let svg = odd.render(1);
        assert!(!svg.contains("<&"), "the label is escaped: {svg}");
    }

    #[test]
    fn wider_text_makes_a_wider_badge() {
        let width = |label: &str| {
            let svg = BadgeLook::parse(Some(label.into()), None, None, None, None)
                .unwrap()
                .render(7);
            let start = svg.find("width=\"").unwrap() + 7;
            let end = start + svg[start..].find('"').unwrap();
            svg[start..end].parse::<f64>().unwrap()
        };
        assert!(width("a much longer label than that") > width("views") + 50.0);
    }

    #[test]
    fn bad_look_parameters_are_named() {
        let error = BadgeLook::parse(None, Some("red;x".into()), None, None, None).unwrap_err();
        assert!(error.contains("`color`"), "{error}");
        let error = BadgeLook::parse(None, None, None, Some("round"), None).unwrap_err();
        assert!(error.contains("`style`"), "{error}");
        let error = BadgeLook::parse(Some("x".repeat(65)), None, None, None, None).unwrap_err();
        assert!(error.contains("`label`"), "{error}");
    }

    #[test]
    fn if_none_match_matches_the_etag_weakly_or_by_star() {
        let tag = etag("<svg/>");
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, &tag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(&headers, &tag));
        let listed = format!("\"other\", W/{}", tag.to_str().unwrap());
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&listed).unwrap(),
        );
        assert!(not_modified(&headers, &tag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&headers, &tag));
    }
}
