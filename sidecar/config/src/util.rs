//! Conversions shared by the readers: protobuf durations, percents and `Any`s, with errors that
//! name the resource and field.

use std::time::Duration;

use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};

use crate::ConfigError;

pub(crate) fn err(resource: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        resource: resource.to_string(),
        reason: reason.into(),
    }
}

/// A non-negative protobuf Duration. Negative ones are invalid in every field we read.
pub(crate) fn duration(
    d: &PbDuration,
    resource: &str,
    field: &str,
) -> Result<Duration, ConfigError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(err(
            resource,
            format!(
                "{field} {}s {}ns is not a valid non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// An optional duration with a default; zero is rejected where Envoy requires `> 0`.
pub(crate) fn positive_duration(
    d: Option<&PbDuration>,
    default: Duration,
    resource: &str,
    field: &str,
) -> Result<Duration, ConfigError> {
    let v = match d {
        Some(d) => duration(d, resource, field)?,
        None => default,
    };
    if v.is_zero() {
        return Err(err(resource, format!("{field} must be greater than zero")));
    }
    Ok(v)
}

/// A percentage in 0..=100, rounded to a whole percent.
pub(crate) fn percent_value(value: f64, resource: &str, field: &str) -> Result<u32, ConfigError> {
    if !value.is_finite() || !(0.0..=100.0).contains(&value) {
        return Err(err(
            resource,
            format!("{field} {value} is not a percentage in 0..=100"),
        ));
    }
    // In range by the check above, so the cast neither truncates nor wraps.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(value.round() as u32)
}

pub(crate) fn percent(
    p: Option<&Percent>,
    default: u32,
    resource: &str,
    field: &str,
) -> Result<u32, ConfigError> {
    match p {
        Some(p) => percent_value(p.value, resource, field),
        None => Ok(default),
    }
}

/// Decodes an `Any` that must hold `M`. The type URL's host part is not checked: only the
/// message name after the last `/` is significant, as in protobuf's own `Any` handling.
pub(crate) fn unpack<M: Message + Name + Default>(
    any: &Any,
    resource: &str,
    field: &str,
) -> Result<M, ConfigError> {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != M::full_name() {
        return Err(err(
            resource,
            format!(
                "{field} holds `{}`, expected `{}`",
                any.type_url,
                M::full_name()
            ),
        ));
    }
    M::decode(any.value.as_slice()).map_err(|e| {
        err(
            resource,
            format!("{field} does not decode as {}: {e}", M::full_name()),
        )
    })
}
