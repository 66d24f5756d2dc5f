//! How `list` and `show` print dead letters.

use std::io::{self, Write};

use serde_json::Value;

use crate::letter::{DeadLetter, Summary, rfc3339};

/// The widest a reason gets in the table; `--json` and `show` print it whole.
const REASON_WIDTH: usize = 60;

/// Prints the summaries as a table with a header line, one letter a line.
pub fn table(out: &mut impl Write, summaries: &[Summary]) -> io::Result<()> {
    let header = ["ID", "TYPE", "KIND", "REASON", "ATTEMPTS", "FAILED AT"];
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|summary| {
            vec![
                or_dash(summary.id.as_deref()),
                or_dash(summary.event_type.as_deref()),
                summary.kind.clone(),
                or_dash(summary.reason.as_deref().map(shorten).as_deref()),
                summary
                    .attempts
                    .map_or_else(|| "-".to_string(), |attempts| attempts.to_string()),
                or_dash(summary.failed_at.as_deref()),
            ]
        })
        .collect();
    shared::table::write(out, &header, &rows)
}

/// Prints the summaries as one pretty JSON array.
pub fn json(out: &mut impl Write, summaries: &[Summary]) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, summaries)?;
    writeln!(out)
}

/// Prints one letter whole: its summary, properties, headers and body (pretty when it is JSON).
pub fn letter(out: &mut impl Write, letter: &DeadLetter) -> io::Result<()> {
    let summary = letter.summary();
    writeln!(out, "id:         {}", or_dash(summary.id.as_deref()))?;
    writeln!(
        out,
        "type:       {}",
        or_dash(summary.event_type.as_deref())
    )?;
    writeln!(out, "kind:       {}", summary.kind)?;
    writeln!(out, "reason:     {}", or_dash(summary.reason.as_deref()))?;
    writeln!(
        out,
        "attempts:   {}",
        summary
            .attempts
            .map_or_else(|| "-".to_string(), |attempts| attempts.to_string())
    )?;
    writeln!(out, "failed at:  {}", or_dash(summary.failed_at.as_deref()))?;

    let properties = letter.properties();
    writeln!(out, "\nproperties:")?;
    if let Some(id) = properties.message_id() {
        writeln!(out, "  message_id: {id}")?;
    }
    if let Some(kind) = properties.kind() {
        writeln!(out, "  type: {kind}")?;
    }
    if let Some(timestamp) = properties.timestamp() {
        writeln!(out, "  timestamp: {timestamp} ({})", rfc3339(*timestamp))?;
    }
    if let Some(content_type) = properties.content_type() {
        writeln!(out, "  content_type: {content_type}")?;
    }
    if let Some(encoding) = properties.content_encoding() {
        writeln!(out, "  content_encoding: {encoding}")?;
    }
    if let Some(mode) = properties.delivery_mode() {
        let meaning = if *mode == 2 {
            "persistent"
        } else {
            "transient"
        };
        writeln!(out, "  delivery_mode: {mode} ({meaning})")?;
    }

    writeln!(out, "\nheaders:")?;
    if let Some(headers) = properties.headers() {
        for (name, value) in headers {
            let value = crate::letter::to_json(value);
            match value {
                Value::String(text) => writeln!(out, "  {name}: {text}")?,
                other => writeln!(out, "  {name}: {other}")?,
            }
        }
    }

    let body = letter.body();
    match shared::json::from_slice::<Value>(body) {
        Ok(value) => {
            writeln!(out, "\nbody ({} bytes, JSON):", body.len())?;
            serde_json::to_writer_pretty(&mut *out, &value)?;
            writeln!(out)
        }
        Err(_) => {
            writeln!(out, "\nbody ({} bytes, raw):", body.len())?;
            writeln!(out, "{}", String::from_utf8_lossy(body))
        }
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

/// The first line of `reason`, cut to [`REASON_WIDTH`] characters.
fn shorten(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or_default();
    if line.chars().count() <= REASON_WIDTH && line.len() == reason.len() {
        return line.to_string();
    }
    let cut: String = line.chars().take(REASON_WIDTH - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str, reason: &str) -> Summary {
        Summary {
            id: Some(id.into()),
            event_type: Some("user.created".into()),
            kind: "permanent".into(),
            reason: Some(reason.into()),
            attempts: Some(1),
            failed_at: None,
        }
    }

    #[test]
    fn the_table_aligns_its_columns_under_a_header() {
        let mut out = Vec::new();
        table(
            &mut out,
            &[summary("msg_1", "not JSON"), summary("msg_22", "no type")],
        )
        .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "ID      TYPE          KIND       REASON    ATTEMPTS  FAILED AT\n\
             msg_1   user.created  permanent  not JSON  1         -\n\
             msg_22  user.created  permanent  no type   1         -\n"
        );
    }

    #[test]
    fn a_long_reason_is_cut_in_the_table() {
        let long = "x".repeat(200);
        let cut = shorten(&long);
        assert_eq!(cut.chars().count(), REASON_WIDTH);
        assert!(cut.ends_with('…'));
        assert_eq!(shorten("two\nlines"), "two…");
        assert_eq!(shorten("short"), "short");
    }
}
