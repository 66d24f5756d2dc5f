//! The table the suite prints, one row per scenario.

use std::fmt::Write;

use crate::scenario::Report;

const HEADER: [&str; 11] = [
    "scenario",
    "sent",
    "2xx",
    "503",
    "retried",
    "applied",
    "duplicates absorbed",
    "lost",
    "dead-lettered",
    "wrong state",
    "result",
];

/// A Markdown table of the reports, so it can be pasted into a README or an issue as it is.
pub fn table(reports: &[&Report]) -> String {
    let rows: Vec<[String; 11]> = reports.iter().map(|report| row(report)).collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        out.push('|');
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index == 0 {
                let _ = write!(out, " {cell:<width$} |");
            } else {
                let _ = write!(out, " {cell:>width$} |");
            }
        }
        out.push('\n');
    };
    line(&mut out, &HEADER.map(str::to_owned));
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(index, width)| {
            if index == 0 {
                "-".repeat(*width)
            } else {
                format!("{}:", "-".repeat(width - 1))
            }
        })
        .collect();
    line(&mut out, &rule);
    for row in &rows {
        line(&mut out, row);
    }
    out
}

fn row(report: &Report) -> [String; 11] {
    let stats = &report.stats;
    let verdict = &report.verdict;
    let result = if report.passed() {
        "ok".to_owned()
    } else if report.error.is_some() {
        "ERROR".to_owned()
    } else {
        "FAILED".to_owned()
    };
    [
        report.scenario.name().to_owned(),
        stats.sent.to_string(),
        stats.accepted.to_string(),
        stats.unavailable.to_string(),
        stats.retried.to_string(),
        verdict.applied.to_string(),
        report
            .duplicates_absorbed
            .map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
        verdict.lost.to_string(),
        verdict.dead_lettered.to_string(),
        verdict.state_mismatches.to_string(),
        result,
    ]
}

/// Everything worth knowing about a report besides its row: the timeline, the sender's other
/// counts and, when it failed, why.
pub fn details(report: &Report) -> String {
    let mut out = String::new();
    let stats = &report.stats;
    let _ = writeln!(out, "== {}", report.scenario.name());
    for line in &report.timeline {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(
        out,
        "  sender: {} connection errors or timeouts, {} other non-2xx answers, {} deliberate \
         redeliveries, {} events never acknowledged",
        stats.connection_errors, stats.other_status, stats.redelivered, report.undelivered
    );
    if !report.other_statuses.is_empty() {
        let codes: Vec<String> = report
            .other_statuses
            .iter()
            .map(|(code, count)| format!("{count} x {code}"))
            .collect();
        let _ = writeln!(
            out,
            "  other answers (retried; a 4xx other than 408/429 fails the scenario): {}",
            codes.join(", ")
        );
    }
    if report.verdict.left_in_queue > 0 || report.verdict.wrong_outcome > 0 {
        let _ = writeln!(
            out,
            "  {} messages left in the worker queue, {} events with an unexpected outcome",
            report.verdict.left_in_queue, report.verdict.wrong_outcome
        );
    }
    for example in &report.verdict.examples {
        let _ = writeln!(out, "  {example}");
    }
    if let Some(error) = &report.error {
        let _ = writeln!(out, "  error: {error}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Verdict;
    use crate::scenario::Scenario;
    use crate::sender::SenderStats;
    use std::collections::BTreeMap;

    fn report(verdict: Verdict) -> Report {
        Report {
            scenario: Scenario::WorkerKill,
            stats: SenderStats {
                sent: 10,
                accepted: 10,
                ..SenderStats::default()
            },
            other_statuses: BTreeMap::new(),
            undelivered: 0,
            duplicates_absorbed: Some(2),
            verdict,
            timeline: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn a_clean_report_passes_and_its_row_says_ok() {
        let clean = report(Verdict {
            applied: 10,
            ..Verdict::default()
        });
        assert!(clean.passed());
        let table = table(&[&clean]);
        assert!(
            table.lines().nth(2).is_some_and(
                |row| row.starts_with("| worker-kill") && row.trim_end().ends_with("ok |")
            ),
            "{table}"
        );
    }

    #[test]
    fn one_lost_event_or_one_dead_letter_fails_the_scenario() {
        let lost = report(Verdict {
            applied: 9,
            lost: 1,
            ..Verdict::default()
        });
        let dead = report(Verdict {
            applied: 10,
            dead_lettered: 1,
            ..Verdict::default()
        });
        for failed in [&lost, &dead] {
            assert!(!failed.passed());
            assert!(table(&[failed]).contains("FAILED"));
        }
    }
}
