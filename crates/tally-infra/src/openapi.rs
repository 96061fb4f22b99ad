//! The schemas the OpenAPI document shares between routes: the rules the edge enforces on
//! names, amounts and idempotency keys, stated so that a client (or a fuzzer) can tell from the
//! document alone whether the server will take a request. Each is built from the constant the
//! validation uses, so the two cannot drift apart.

use std::borrow::Cow;

use tally_core::amount::MAX_ABS_AMOUNT;
use tally_core::idempotency::MAX_IDEMPOTENCY_KEY_LEN;
use tally_core::name::{MAX_NAME_CHARS, NAME_PATTERN};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
};

/// A counter name: 1 to 256 characters, no control characters.
pub fn counter_name_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_NAME_CHARS))
        .pattern(Some(NAME_PATTERN))
        .description(Some(
            "A counter name: 1 to 256 characters (Unicode scalar values, not bytes), none of \
             them a control character (U+0000 to U+001F, U+007F to U+009F). Percent-encoded in \
             paths and query strings.",
        ))
        .into()
}

/// [`counter_name_schema`] as a type, for `params(("name" = inline(CounterNameSchema), Path))`.
pub struct CounterNameSchema;

impl utoipa::PartialSchema for CounterNameSchema {
    fn schema() -> RefOr<Schema> {
        counter_name_schema().into()
    }
}

impl utoipa::ToSchema for CounterNameSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CounterName")
    }
}

/// An increment amount: a nonzero integer with |by| <= 10^12.
pub fn amount_schema() -> Schema {
    let range = |minimum: i64, maximum: i64| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(minimum))
            .maximum(Some(maximum))
    };
    OneOfBuilder::new()
        .item(range(-MAX_ABS_AMOUNT, -1))
        .item(range(1, MAX_ABS_AMOUNT))
        .description(Some(
            "A nonzero integer with an absolute value of at most 10^12; a negative amount \
             takes increments back. Defaults to 1.",
        ))
        .into()
}

/// An idempotency key in a JSON body: 1 to 128 printable ASCII characters.
pub fn idempotency_key_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_IDEMPOTENCY_KEY_LEN))
        .pattern(Some(format!("^[ -~]{{1,{MAX_IDEMPOTENCY_KEY_LEN}}}$")))
        .description(Some(
            "1 to 128 printable ASCII characters (U+0020 to U+007E). The increment counts once \
             for 24 hours, however often it is sent.",
        ))
        .into()
}

/// The `Idempotency-Key` header: the same keys as in a body, except that a header value cannot
/// begin or end with a space (HTTP strips them).
pub struct IdempotencyKeyHeaderSchema;

impl utoipa::PartialSchema for IdempotencyKeyHeaderSchema {
    fn schema() -> RefOr<Schema> {
        let inner = MAX_IDEMPOTENCY_KEY_LEN - 2;
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_IDEMPOTENCY_KEY_LEN))
            .pattern(Some(format!("^[!-~]([ -~]{{0,{inner}}}[!-~])?$")))
            .description(Some(
                "1 to 128 printable ASCII characters, not beginning or ending with a space. \
                 The increment counts once for 24 hours, however often it is sent.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for IdempotencyKeyHeaderSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("IdempotencyKeyHeader")
    }
}

/// [`idempotency_key_schema`], or `null`, which means no key.
pub fn nullable_idempotency_key_schema() -> Schema {
    let Schema::Object(mut schema) = idempotency_key_schema() else {
        unreachable!("idempotency_key_schema builds an object schema");
    };
    schema.schema_type = utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]);
    Schema::Object(schema)
}
