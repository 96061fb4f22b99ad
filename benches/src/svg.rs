//! A hand-written SVG plot of p99 latency against throughput, one line per scenario.
//!
//! Both axes are logarithmic: on one machine the systems compared span three or four orders of
//! magnitude in throughput (a PostgreSQL row to pipelined Redis) and in latency. Written by hand
//! because a plotting crate would outweigh the whole load tool for one chart.

use std::fmt::Write as _;

/// One measured point: a phase's increment throughput and its p99 latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlotPoint {
    pub increments_per_second: f64,
    pub p99_millis: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlotSeries {
    pub label: String,
    pub points: Vec<PlotPoint>,
}

const WIDTH: f64 = 1_000.0;
const HEIGHT: f64 = 560.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 660.0;
const PLOT_TOP: f64 = 50.0;
const PLOT_BOTTOM: f64 = 490.0;
const LEGEND_LEFT: f64 = 685.0;

/// Distinguishable on white and for the common kinds of color blindness (Okabe–Ito without its
/// yellow, too pale on white, then greys); series past the tenth reuse colors.
const SERIES_COLORS: [&str; 10] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000", "#882255",
    "#666666", "#AAAAAA",
];

/// A base-10 logarithmic axis spanning whole decades, mapped onto a pixel range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogAxis {
    pub lowest_decade_exponent: i32,
    pub highest_decade_exponent: i32,
    pixel_at_lowest: f64,
    pixel_at_highest: f64,
}

impl LogAxis {
    /// The smallest span of whole decades containing every positive value (one decade when all
    /// values are equal; 1 to 10 when there are none). Non-positive values cannot be placed on a
    /// log axis and are ignored.
    pub fn covering(
        values: impl IntoIterator<Item = f64>,
        pixel_at_lowest: f64,
        pixel_at_highest: f64,
    ) -> Self {
        let (mut lowest, mut highest) = (f64::INFINITY, f64::NEG_INFINITY);
        for value in values
            .into_iter()
            .filter(|value| value.is_finite() && *value > 0.0)
        {
            lowest = lowest.min(value);
            highest = highest.max(value);
        }
        let (lowest_decade_exponent, mut highest_decade_exponent) = if lowest.is_finite() {
            (lowest.log10().floor() as i32, highest.log10().ceil() as i32)
        } else {
            (0, 1)
        };
        if highest_decade_exponent <= lowest_decade_exponent {
            highest_decade_exponent = lowest_decade_exponent + 1;
        }
        Self {
            lowest_decade_exponent,
            highest_decade_exponent,
            pixel_at_lowest,
            pixel_at_highest,
        }
    }

    /// The pixel coordinate of a positive value.
    pub fn position(&self, value: f64) -> f64 {
        let span = f64::from(self.highest_decade_exponent - self.lowest_decade_exponent);
        let fraction = (value.log10() - f64::from(self.lowest_decade_exponent)) / span;
        self.pixel_at_lowest + fraction * (self.pixel_at_highest - self.pixel_at_lowest)
    }

    pub fn decades(&self) -> impl Iterator<Item = i32> {
        self.lowest_decade_exponent..=self.highest_decade_exponent
    }
}

/// `10^exponent` as an axis label: `0.01`, `1`, `10k`, `1M`.
pub fn decade_label(exponent: i32) -> String {
    match exponent {
        ..0 => format!("{}", 10f64.powi(exponent)),
        0..3 => format!("{}", 10i64.pow(exponent as u32)),
        3..6 => format!("{}k", 10i64.pow(exponent as u32 - 3)),
        6..9 => format!("{}M", 10i64.pow(exponent as u32 - 6)),
        _ => format!("1e{exponent}"),
    }
}

pub fn escape_xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn is_plottable(point: &PlotPoint) -> bool {
    [point.increments_per_second, point.p99_millis]
        .iter()
        .all(|value| value.is_finite() && *value > 0.0)
}

/// The whole SVG document. Points within a series are joined in order of throughput; `notes`
/// are printed line by line under the legend.
pub fn latency_vs_throughput_svg(title: &str, notes: &[&str], series: &[PlotSeries]) -> String {
    let plottable: Vec<PlotSeries> = series
        .iter()
        .map(|one_series| {
            let mut points: Vec<PlotPoint> = one_series
                .points
                .iter()
                .copied()
                .filter(is_plottable)
                .collect();
            points.sort_by(|left, right| {
                left.increments_per_second
                    .total_cmp(&right.increments_per_second)
            });
            PlotSeries {
                label: one_series.label.clone(),
                points,
            }
        })
        .filter(|one_series| !one_series.points.is_empty())
        .collect();
    let all_points = || {
        plottable
            .iter()
            .flat_map(|one_series| one_series.points.iter())
    };
    let x_axis = LogAxis::covering(
        all_points().map(|point| point.increments_per_second),
        PLOT_LEFT,
        PLOT_RIGHT,
    );
    // Latency grows upwards: the lowest decade sits at the bottom of the plot.
    let y_axis = LogAxis::covering(
        all_points().map(|point| point.p99_millis),
        PLOT_BOTTOM,
        PLOT_TOP,
    );

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        escape_xml(title)
    );

    for exponent in x_axis.decades() {
        let x = x_axis.position(10f64.powi(exponent));
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{PLOT_TOP}" x2="{x:.1}" y2="{PLOT_BOTTOM}" stroke="#dddddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            PLOT_BOTTOM + 18.0,
            decade_label(exponent)
        );
    }
    for exponent in y_axis.decades() {
        let y = y_axis.position(10f64.powi(exponent));
        let _ = writeln!(
            svg,
            r##"<line x1="{PLOT_LEFT}" y1="{y:.1}" x2="{PLOT_RIGHT}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{} ms</text>"##,
            PLOT_LEFT - 8.0,
            y + 4.0,
            decade_label(exponent)
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{PLOT_LEFT}" y="{PLOT_TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        PLOT_RIGHT - PLOT_LEFT,
        PLOT_BOTTOM - PLOT_TOP
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">throughput (increments/s, log scale)</text>"#,
        (PLOT_LEFT + PLOT_RIGHT) / 2.0,
        PLOT_BOTTOM + 45.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="{0}" text-anchor="middle" transform="rotate(-90 20 {0})">p99 latency (ms, log scale)</text>"#,
        (PLOT_TOP + PLOT_BOTTOM) / 2.0
    );

    if plottable.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
            (PLOT_LEFT + PLOT_RIGHT) / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0
        );
    }
    for (index, one_series) in plottable.iter().enumerate() {
        let color = SERIES_COLORS[index % SERIES_COLORS.len()];
        let coordinates: Vec<String> = one_series
            .points
            .iter()
            .map(|point| {
                format!(
                    "{:.1},{:.1}",
                    x_axis.position(point.increments_per_second),
                    y_axis.position(point.p99_millis)
                )
            })
            .collect();
        if coordinates.len() > 1 {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                coordinates.join(" ")
            );
        }
        for coordinate in &coordinates {
            let (x, y) = coordinate.split_once(',').expect("formatted as x,y above");
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{color}"/>"#);
        }
        let legend_y = PLOT_TOP + 10.0 + 22.0 * index as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{LEGEND_LEFT}" y="{:.1}" width="14" height="14" fill="{color}"/><text x="{}" y="{:.1}">{}</text>"#,
            legend_y - 11.0,
            LEGEND_LEFT + 20.0,
            legend_y,
            escape_xml(&one_series.label)
        );
    }
    let notes_top = PLOT_TOP + 22.0 * plottable.len() as f64 + 30.0;
    for (line_index, note) in notes.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{LEGEND_LEFT}" y="{:.1}" font-size="11" fill="#444444">{}</text>"##,
            notes_top + 15.0 * line_index as f64,
            escape_xml(note)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(increments_per_second: f64, p99_millis: f64) -> PlotPoint {
        PlotPoint {
            increments_per_second,
            p99_millis,
        }
    }

    #[test]
    fn a_log_axis_spans_whole_decades_and_maps_them_evenly() {
        let axis = LogAxis::covering([3.0, 4_500.0], 100.0, 500.0);
        assert_eq!(axis.lowest_decade_exponent, 0);
        assert_eq!(axis.highest_decade_exponent, 4);
        assert!((axis.position(1.0) - 100.0).abs() < 1e-9);
        assert!((axis.position(100.0) - 300.0).abs() < 1e-9);
        assert!((axis.position(10_000.0) - 500.0).abs() < 1e-9);
        assert!(axis.position(3.0) < axis.position(4_500.0));
        assert_eq!(axis.decades().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_log_axis_can_run_backwards_and_survives_degenerate_input() {
        // A y axis: larger values higher up, that is at smaller pixel coordinates.
        let y_axis = LogAxis::covering([0.5, 20.0], 490.0, 50.0);
        assert_eq!(
            (
                y_axis.lowest_decade_exponent,
                y_axis.highest_decade_exponent
            ),
            (-1, 2)
        );
        assert!(y_axis.position(20.0) < y_axis.position(0.5));
        let single = LogAxis::covering([1_000.0], 0.0, 1.0);
        assert_eq!(
            (
                single.lowest_decade_exponent,
                single.highest_decade_exponent
            ),
            (3, 4)
        );
        let empty = LogAxis::covering([0.0, -5.0, f64::NAN], 0.0, 1.0);
        assert_eq!(
            (empty.lowest_decade_exponent, empty.highest_decade_exponent),
            (0, 1)
        );
    }

    #[test]
    fn decade_labels_are_short() {
        assert_eq!(decade_label(-2), "0.01");
        assert_eq!(decade_label(0), "1");
        assert_eq!(decade_label(2), "100");
        assert_eq!(decade_label(4), "10k");
        assert_eq!(decade_label(6), "1M");
        assert_eq!(decade_label(9), "1e9");
    }

    #[test]
    fn the_plot_has_a_line_and_markers_per_series_and_a_legend() {
        let series = vec![
            PlotSeries {
                label: "Naive PG row".to_string(),
                points: vec![point(1_000.0, 40.0), point(250.0, 2.0), point(500.0, 3.0)],
            },
            PlotSeries {
                label: "Redis <INCR> & co".to_string(),
                points: vec![point(50_000.0, 1.5)],
            },
        ];
        let svg = latency_vs_throughput_svg("p99 vs throughput", &["a note: 1 < 2"], &series);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // A single point gets a marker but no line.
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains(">Naive PG row</text>"));
        assert!(svg.contains(">Redis &lt;INCR&gt; &amp; co</text>"));
        // Points are joined in order of throughput: the 250/s point comes first.
        let polyline = svg
            .lines()
            .find(|line| line.starts_with("<polyline"))
            .unwrap();
        let x_values: Vec<f64> = polyline
            .split("points=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches("\"/>")
            .split(' ')
            .map(|pair| pair.split_once(',').unwrap().0.parse().unwrap())
            .collect();
        assert!(
            x_values.windows(2).all(|pair| pair[0] < pair[1]),
            "{x_values:?}"
        );
        // Every point lies inside the plot area.
        assert!(
            x_values
                .iter()
                .all(|x| (PLOT_LEFT..=PLOT_RIGHT).contains(x))
        );
        assert!(svg.contains(">10k</text>") && svg.contains(">100 ms</text>"));
        assert!(svg.contains(">a note: 1 &lt; 2</text>"));
    }

    #[test]
    fn unplottable_points_are_left_out() {
        let series = vec![PlotSeries {
            label: "all failed".to_string(),
            points: vec![point(0.0, 5.0), point(100.0, 0.0)],
        }];
        let svg = latency_vs_throughput_svg("nothing", &[], &series);
        assert!(svg.contains(">no data</text>"));
        assert!(!svg.contains("<circle"));
        assert!(!svg.contains("all failed"));
    }
}
