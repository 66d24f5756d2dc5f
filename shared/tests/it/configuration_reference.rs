//! docs/configuration.md lists exactly the settings the code reads, with the same defaults.
//!
//! Two tables of that page are checked:
//! - "Settings": one row per field of [`shared::Settings`] (a field is named like its variable,
//!   lower-cased), the default being what `Settings::default()` serializes to. A setting without
//!   a default (a secret, an interval that is off) has no code span in its default cell.
//! - "Read outside the settings": every variable some workspace code reads by another way
//!   (`std::env::var`, `std::env::var_os`, a clap `env = "…"` attribute, `tracing`'s
//!   `EnvFilter::try_from_default_env`), found by reading every `.rs` file of the workspace's
//!   members. Where the default is a constant of the code (`RUST_LOG`'s filter, the services the
//!   tests use), the documented default is compared with it; the others are computed at run time
//!   and only named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

const REFERENCE: &str = "docs/configuration.md";
const SETTINGS_SECTION: &str = "## Settings";
const OUTSIDE_SECTION: &str = "## Read outside the settings";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the shared crate lies in the workspace")
        .to_path_buf()
}

/// One table row: the variable and the default cell's first code span, if any.
#[derive(Debug)]
struct Row {
    variable: String,
    default: Option<String>,
}

fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The rows of the first table after `heading`, keyed by variable, failing on a repeated one.
fn table(page: &str, heading: &str) -> BTreeMap<String, Row> {
    let start = page
        .lines()
        .position(|line| line.trim_end() == heading)
        .unwrap_or_else(|| panic!("{REFERENCE} has no heading `{heading}`"));
    let lines: Vec<&str> = page
        .lines()
        .skip(start + 1)
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .collect();
    assert!(lines.len() > 2, "no table under `{heading}` in {REFERENCE}");
    let header: Vec<&str> = lines[0].split('|').map(str::trim).collect();
    assert_eq!(
        header.get(1..3),
        Some(&["Variable", "Default"][..]),
        "the table under `{heading}` starts with the columns Variable and Default"
    );
    let mut rows = BTreeMap::new();
    for line in &lines[2..] {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let variable = match code_spans(cells[1]).as_slice() {
            [variable] => (*variable).to_owned(),
            _ => panic!("`{heading}`: the first cell names one variable in a code span: {line}"),
        };
        let default = code_spans(cells[2]).first().map(|span| (*span).to_owned());
        let row = Row {
            variable: variable.clone(),
            default,
        };
        assert!(
            rows.insert(variable.clone(), row).is_none(),
            "`{heading}` lists {variable} twice"
        );
    }
    rows
}

fn reference() -> String {
    let path = workspace_root().join(REFERENCE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A default as the page writes it: strings as they are, numbers and booleans as literals.
fn written(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        Value::Number(_) | Value::Bool(_) => Some(value.to_string()),
        other => panic!("a setting of a type the reference cannot show: {other}"),
    }
}

#[test]
fn every_setting_is_documented_once_with_its_default_and_nothing_else_is() {
    let page = reference();
    let documented = table(&page, SETTINGS_SECTION);
    let Value::Object(settings) =
        serde_json::to_value(shared::Settings::default()).expect("Settings serializes")
    else {
        panic!("Settings serializes to an object");
    };
    let in_code: BTreeMap<String, Option<String>> = settings
        .iter()
        .map(|(key, value)| (key.to_uppercase(), written(value)))
        .collect();

    let code_names: BTreeSet<&String> = in_code.keys().collect();
    let doc_names: BTreeSet<&String> = documented.keys().collect();
    let undocumented: Vec<_> = code_names.difference(&doc_names).collect();
    let unknown: Vec<_> = doc_names.difference(&code_names).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{REFERENCE} `{SETTINGS_SECTION}` and shared::Settings differ: settings without a row \
         {undocumented:?}, rows without a setting {unknown:?}"
    );

    let differing: Vec<String> = documented
        .values()
        .filter(|row| row.default != in_code[&row.variable])
        .map(|row| {
            format!(
                "{}: documented {:?}, Settings::default() has {:?}",
                row.variable, row.default, in_code[&row.variable]
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "defaults in {REFERENCE} differ from the code:\n{}",
        differing.join("\n")
    );
}

/// The members of the workspace, from its Cargo.toml.
fn members(root: &Path) -> Vec<PathBuf> {
    let manifest = config::Config::builder()
        .add_source(config::File::from(root.join("Cargo.toml")))
        .build()
        .expect("the workspace's Cargo.toml parses");
    manifest
        .get_array("workspace.members")
        .expect("workspace.members")
        .into_iter()
        .map(|member| root.join(member.into_string().expect("a member is a path")))
        .collect()
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() && path.file_name() != Some("target".as_ref()) {
            rust_files(&path, into);
        } else if path.extension() == Some("rs".as_ref()) {
            into.push(path);
        }
    }
}

/// The variables a source text reads other than through `Settings`.
fn variables_read(source: &str) -> BTreeSet<String> {
    let mut read = BTreeSet::new();
    for opening in ["env::var(\"", "env::var_os(\"", "env = \""] {
        for (at, _) in source.match_indices(opening) {
            let rest = &source[at + opening.len()..];
            if let Some(end) = rest.find('"') {
                read.insert(rest[..end].to_owned());
            }
        }
    }
    if source.contains("EnvFilter::try_from_default_env") {
        read.insert(tracing_subscriber::EnvFilter::DEFAULT_ENV.to_owned());
    }
    read
}

#[test]
fn every_variable_read_outside_the_settings_is_documented_and_nothing_else_is() {
    let root = workspace_root();
    let mut files = Vec::new();
    for member in members(&root) {
        let before = files.len();
        rust_files(&member, &mut files);
        assert!(files.len() > before, "no Rust file in {}", member.display());
    }
    // This file names every way of reading a variable, as examples: it is left out.
    let this_file = |file: &&PathBuf| file.ends_with(file!());
    assert_eq!(files.iter().filter(this_file).count(), 1, "{}", file!());
    let mut read: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|file| !this_file(file)) {
        let source = std::fs::read_to_string(file).expect("a readable source file");
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        for variable in variables_read(&source) {
            read.entry(variable).or_default().insert(shown.clone());
        }
    }
    // Found by the reading above, so this test can never pass by finding nothing.
    assert!(read.contains_key("RUST_LOG"), "{read:?}");

    let page = reference();
    let documented = table(&page, OUTSIDE_SECTION);
    let undocumented: Vec<String> = read
        .iter()
        .filter(|(variable, _)| !documented.contains_key(*variable))
        .map(|(variable, files)| format!("{variable} (read in {files:?})"))
        .collect();
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|variable| !read.contains_key(*variable))
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{REFERENCE} `{OUTSIDE_SECTION}` and the code differ: read but not listed \
         {undocumented:?}, listed but read nowhere {unknown:?}"
    );

    for (variable, default) in [
        ("RUST_LOG", shared::telemetry::DEFAULT_FILTER),
        ("DATABASE_URL", test_support::services::DEFAULT_DATABASE_URL),
        ("AMQP_URL", test_support::services::DEFAULT_AMQP_URL),
    ] {
        assert_eq!(
            documented[variable].default.as_deref(),
            Some(default),
            "the default of {variable} in {REFERENCE} `{OUTSIDE_SECTION}`"
        );
    }
}

#[test]
fn the_reading_finds_each_way_of_reading_a_variable() {
    let source = r#"
        let a = std::env::var("ALPHA");
        let b = std::env::var_os("BETA");
        #[arg(long, env = "GAMMA")]
        let filter = EnvFilter::try_from_default_env();
        command.env("NOT_READ", "set for a child");
    "#;
    let read: Vec<String> = variables_read(source).into_iter().collect();
    assert_eq!(read, ["ALPHA", "BETA", "GAMMA", "RUST_LOG"]);
}
