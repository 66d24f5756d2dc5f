//! Plain-text tables for the command-line tools (`worker dlq list`, `worker events list`,
//! `worker explain`): a header line and one line a row, columns aligned by padding, the last
//! column never padded so a long reason does not widen every line.

use std::io::{self, Write};

/// Writes `rows` under `header`, each column as wide as its widest cell plus two spaces.
pub fn write(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|title| title.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if index + 1 < row.len() {
                let padding = width - cell.chars().count();
                line.push_str(&" ".repeat(padding + 2));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_under_the_header_and_the_last_one_is_not_padded() {
        let mut out = Vec::new();
        let rows = vec![
            vec!["a".to_string(), "long cell".to_string(), "x".to_string()],
            vec![
                "bbb".to_string(),
                "c".to_string(),
                "a long last cell".to_string(),
            ],
        ];
        write(&mut out, &["ID", "WHAT", "WHY"], &rows).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "ID   WHAT       WHY\n\
             a    long cell  x\n\
             bbb  c          a long last cell\n"
        );
    }
}
