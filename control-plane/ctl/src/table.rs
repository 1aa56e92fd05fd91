//! Plain-text tables and the small formatting rules every command shares.

/// Columns padded to their widest cell, two spaces apart; the last column is not padded, so a
/// long reason at the end of a row does not widen every other row.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                if i + 1 < line.len() {
                    let pad = widths[i] - cell.chars().count();
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A duration in the largest whole unit that fits, as `kubectl get` shows ages: `3s`, `5m`,
/// `2h`, `4d`. A time in the future (clocks of two machines disagree) counts as `0s`.
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// How long ago `at` (Unix ms) was, or `-` when unknown.
pub fn age_since(at: Option<i64>, now_ms: i64) -> String {
    at.map_or_else(|| "-".to_string(), |t| age(now_ms - t))
}

/// Versions are 16 hex digits of content hash; 8 tell them apart in practice and keep rows
/// short. `-` when there is none.
pub fn short_version(v: Option<&str>) -> String {
    match v {
        Some(v) if !v.is_empty() => v.chars().take(8).collect(),
        _ => "-".to_string(),
    }
}

/// A free-text reason on one line: Envoy's error details may hold line breaks, which would
/// break a table row.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The xDS type a type URL names, by its discovery service's short name.
pub fn type_short(type_url: &str) -> String {
    match type_url.rsplit('/').next().unwrap_or(type_url) {
        "envoy.config.cluster.v3.Cluster" => "CDS".to_string(),
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => "EDS".to_string(),
        "envoy.config.listener.v3.Listener" => "LDS".to_string(),
        "envoy.config.route.v3.RouteConfiguration" => "RDS".to_string(),
        other => other.rsplit('.').next().unwrap_or(other).to_string(),
    }
}

/// Order of types in every listing: CDS, EDS, LDS, RDS (the order a proxy asks for them),
/// then any other type by name.
pub fn type_rank(type_url: &str) -> (usize, String) {
    let short = type_short(type_url);
    let rank = ["CDS", "EDS", "LDS", "RDS"]
        .iter()
        .position(|t| *t == short)
        .unwrap_or(4);
    (rank, short)
}

/// `SotW ADS`, `Delta EDS`: the protocol variant and the discovery service of a stream.
pub fn api(variant: &str, service: &str) -> String {
    let variant = match variant {
        "sotw" => "SotW".to_string(),
        "delta" => "Delta".to_string(),
        "" => "?".to_string(),
        other => other.to_string(),
    };
    if service.is_empty() {
        variant
    } else {
        format!("{variant} {}", service.to_uppercase())
    }
}

/// `-` for an absent or empty value.
pub fn or_dash(v: Option<&str>) -> String {
    match v {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_the_last_is_not_padded() {
        let mut t = Table::new(&["A", "LONGER", "LAST"]);
        t.row(vec!["xxxx".into(), "y".into(), "a long reason".into()]);
        t.row(vec!["z".into(), "".into(), "r".into()]);
        assert_eq!(
            t.render(),
            "A     LONGER  LAST\nxxxx  y       a long reason\nz             r\n"
        );
    }

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(age(3_400), "3s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(300_000), "5m");
        assert_eq!(age(2 * 3_600_000 + 5), "2h");
        assert_eq!(age(3 * 86_400_000), "3d");
        assert_eq!(age(-5_000), "0s");
        assert_eq!(age_since(None, 1), "-");
    }

    #[test]
    fn versions_types_and_apis_are_short() {
        assert_eq!(short_version(Some("b705507af0311a11")), "b705507a");
        assert_eq!(short_version(Some("7")), "7");
        assert_eq!(short_version(None), "-");
        assert_eq!(
            type_short("type.googleapis.com/envoy.config.route.v3.RouteConfiguration"),
            "RDS"
        );
        assert_eq!(
            type_short("type.googleapis.com/envoy.extensions.Foo"),
            "Foo"
        );
        assert_eq!(api("delta", "ads"), "Delta ADS");
        assert_eq!(one_line("a\n  b\tc"), "a b c");
    }
}
