//! Where raw `key → value` entries come from: TOML files, YAML files (Flink's
//! flat `flink-conf.yaml` and nested `config.yaml`), the `STRATA_PROPERTIES`
//! variable and `-D key=value` arguments.
//!
//! Nothing here knows the keys or their types: each source yields [`Entry`]s in
//! file order, each tagged with its [`Origin`], and `Config` applies them in
//! precedence order. Line numbers are 1-based.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// The `STRATA_PROPERTIES` environment variable.
    Env,
    /// A `-D key=value` argument.
    CommandLine,
    Default,
}

/// A [`ConfigSource`] plus the line, where one is known; errors print it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub source: ConfigSource,
    pub line: Option<u32>,
}

/// A value as a source spelled it, before the key's type is known.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) value: RawValue,
    pub(super) origin: Origin,
}

/// Reads a `.toml` file, or a `.yaml`/`.yml` file as Flink writes them.
pub(super) fn read_file(path: &Path) -> Result<Vec<Entry>, ConfigError> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let is_toml = match extension.to_ascii_lowercase().as_str() {
        "toml" => true,
        "yaml" | "yml" => false,
        _ => return Err(ConfigError::UnsupportedFileFormat { path: path.into() }),
    };
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::FileRead {
        path: path.into(),
        cause,
    })?;
    if is_toml {
        return parse_toml(&text, path);
    }
    let lines = parse_yaml(&text).map_err(|(line, reason)| ConfigError::FileParse {
        path: path.into(),
        line: Some(line),
        message: reason.to_owned(),
    })?;
    Ok(yaml_entries(lines, |line| Origin::file(path, Some(line))))
}

/// Parses `STRATA_PROPERTIES`: newline-separated `key: value` lines (YAML),
/// as Flink's `FLINK_PROPERTIES`.
pub(super) fn parse_env_properties(text: &str) -> Result<Vec<Entry>, ConfigError> {
    let lines =
        parse_yaml(text).map_err(|(line, reason)| ConfigError::PropertiesParse { line, reason })?;
    Ok(yaml_entries(lines, |line| Origin {
        source: ConfigSource::Env,
        line: Some(line),
    }))
}

/// Parses `-D` arguments, each `key=value`.
pub(super) fn parse_overrides(arguments: &[String]) -> Result<Vec<Entry>, ConfigError> {
    let entry = |argument: &String| {
        let malformed = || ConfigError::MalformedOverride {
            argument: argument.clone(),
        };
        let (key, value) = argument.split_once('=').ok_or_else(malformed)?;
        if key.trim().is_empty() {
            return Err(malformed());
        }
        Ok(Entry {
            key: key.trim().to_owned(),
            value: RawValue::Text(value.trim().to_owned()),
            origin: Origin {
                source: ConfigSource::CommandLine,
                line: None,
            },
        })
    };
    arguments.iter().map(entry).collect()
}

fn parse_toml(text: &str, path: &Path) -> Result<Vec<Entry>, ConfigError> {
    let table = DeTable::parse(text).map_err(|error| ConfigError::FileParse {
        path: path.into(),
        line: error.span().map(|span| line_at(text, span.start)),
        message: error.message().trim().to_owned(),
    })?;
    let mut entries = Vec::new();
    flatten_toml(table.get_ref(), "", &TomlFile { text, path }, &mut entries)?;
    Ok(entries)
}

struct TomlFile<'a> {
    text: &'a str,
    path: &'a Path,
}

/// Turns nested tables into dotted keys: `[taskmanager] numberOfTaskSlots = 4`
/// becomes `taskmanager.numberOfTaskSlots`.
fn flatten_toml(
    table: &DeTable<'_>,
    prefix: &str,
    file: &TomlFile<'_>,
    entries: &mut Vec<Entry>,
) -> Result<(), ConfigError> {
    for (name, value) in table.iter() {
        let key = match prefix {
            "" => name.get_ref().to_string(),
            _ => format!("{prefix}.{}", name.get_ref()),
        };
        let origin = Origin::file(file.path, Some(line_at(file.text, name.span().start)));
        let raw = match value.get_ref() {
            DeValue::Table(inner) => {
                flatten_toml(inner, &key, file, entries)?;
                continue;
            }
            DeValue::String(text) => RawValue::Text(text.to_string()),
            // Beyond i64 (a u64 byte count), keep the digits and let the key's parser decide.
            DeValue::Integer(number) => i64::from_str_radix(number.as_str(), number.radix())
                .map_or_else(|_| RawValue::Text(number.to_string()), RawValue::Integer),
            DeValue::Float(number) => RawValue::Float(number.as_str().parse().unwrap_or(f64::NAN)),
            DeValue::Boolean(flag) => RawValue::Bool(*flag),
            DeValue::Datetime(datetime) => RawValue::Text(datetime.to_string()),
            DeValue::Array(items) => {
                let strings: Option<Vec<String>> = items
                    .iter()
                    .map(|item| item.get_ref().as_str().map(str::to_owned))
                    .collect();
                let Some(strings) = strings else {
                    return Err(ConfigError::InvalidValue {
                        key,
                        value: file.text[value.span()].to_owned(),
                        origin,
                        reason: "a list may only hold strings",
                    });
                };
                RawValue::List(strings)
            }
        };
        entries.push(Entry {
            key,
            value: raw,
            origin,
        });
    }
    Ok(())
}

/// One setting of a YAML source: (line number, dotted key, value).
type YamlLine = (u32, String, RawValue);

/// A key whose value is the block below it (`taskmanager:` then indented
/// lines), while that block is read.
struct OpenKey {
    /// The column of the key.
    indent: usize,
    /// The full dotted key.
    key: String,
    line: u32,
    /// The column of the block's lines, once its first line is read.
    child_indent: Option<usize>,
    /// `Some` once the block turned out to be a list (`- item` lines).
    items: Option<Vec<String>>,
}

/// Parses Flink's YAML: the flat `key: value` lines of `flink-conf.yaml`
/// and the nested blocks of Flink 2's `config.yaml` alike, so
/// `taskmanager:` / `  numberOfTaskSlots: 4` is `taskmanager.numberOfTaskSlots`.
/// A list is `[a, b]` or `- item` lines. `#` comments, blank lines, quotes
/// and `---` are read; what a config needs no more of (maps in flow style,
/// block scalars, anchors, tags, tabs for indentation) is refused, naming
/// the line, rather than misread.
fn parse_yaml(text: &str) -> Result<Vec<YamlLine>, (u32, &'static str)> {
    let mut settings = Vec::new();
    let mut open: Vec<OpenKey> = Vec::new();
    // The column of the top-level keys, set by the first one.
    let mut top_indent: Option<usize> = None;
    for (number, line) in (1u32..).zip(text.lines()) {
        let content = line.trim_end();
        let unindented = content.trim_start_matches(' ');
        if unindented.starts_with('\t') {
            return Err((number, "tabs are not allowed for indentation in YAML"));
        }
        if unindented.is_empty() || unindented.starts_with('#') {
            continue;
        }
        if matches!(unindented, "---" | "...") {
            if !open.is_empty() || content.len() != unindented.len() {
                return Err((number, "a document marker inside a block"));
            }
            continue;
        }
        let indent = content.len() - unindented.len();
        // A list may sit at its key's own column (`dirs:` then `- /a` below
        // the `d`), as kubectl and many editors write it.
        let item = unindented == "-" || unindented.starts_with("- ");
        let list_at_key = |top: &OpenKey| {
            item && indent == top.indent && top.child_indent.is_none_or(|c| c == indent)
        };
        // Close the blocks this line is not inside of.
        while open
            .last()
            .is_some_and(|top| indent <= top.indent && !list_at_key(top))
        {
            let closed = open.pop().expect("checked above");
            close_block(closed, &mut settings)?;
        }
        let parent_key = match open.last_mut() {
            Some(parent) => {
                match parent.child_indent {
                    None => parent.child_indent = Some(indent),
                    Some(expected) if expected == indent => {}
                    Some(_) => {
                        return Err((number, "this line's indentation matches no block above it"));
                    }
                }
                if let Some(item) = unindented.strip_prefix('-') {
                    if !item.is_empty() && !item.starts_with(' ') {
                        return Err((number, "expected a space after `-` in a list item"));
                    }
                    if parent.items.is_none() && settings_in(&settings, &parent.key) {
                        return Err((number, "a list item among the keys of a block"));
                    }
                    let items = parent.items.get_or_insert_with(Vec::new);
                    let value = scalar(item).map_err(|reason| (number, reason))?;
                    items.push(value);
                    continue;
                }
                if parent.items.is_some() {
                    return Err((number, "a key among the items of a list"));
                }
                Some(parent.key.clone())
            }
            None => {
                match top_indent {
                    None => top_indent = Some(indent),
                    Some(expected) if expected == indent => {}
                    Some(_) => {
                        return Err((number, "this line's indentation matches no block above it"));
                    }
                }
                if unindented.starts_with('-') {
                    return Err((
                        number,
                        "a list item needs a key above it (`key:` then `- item`)",
                    ));
                }
                None
            }
        };
        let (name, rest) = split_key(unindented).ok_or((number, "expected `key: value`"))?;
        if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
            return Err((number, "expected a space after `:` in `key: value`"));
        }
        let name = unquote_key(name.trim_end()).map_err(|reason| (number, reason))?;
        if name.is_empty() {
            return Err((number, "expected `key: value`"));
        }
        let key = match parent_key {
            Some(prefix) => format!("{prefix}.{name}"),
            None => name,
        };
        let value = strip_comment(rest.trim());
        if value.is_empty() {
            // `key:` alone: its value is the block below.
            open.push(OpenKey {
                indent,
                key,
                line: number,
                child_indent: None,
                items: None,
            });
            continue;
        }
        let value = if value.starts_with('[') {
            RawValue::List(flow_list(value).map_err(|reason| (number, reason))?)
        } else {
            RawValue::Text(scalar(rest).map_err(|reason| (number, reason))?)
        };
        settings.push((number, key, value));
    }
    while let Some(closed) = open.pop() {
        close_block(closed, &mut settings)?;
    }
    Ok(settings)
}

/// Whether `settings` holds a key inside the block `prefix`.
fn settings_in(settings: &[YamlLine], prefix: &str) -> bool {
    settings.iter().any(|(_, key, _)| {
        key.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Ends the block of `key:`: a list becomes its value; a block with
/// neither keys nor items is a key without a value.
fn close_block(closed: OpenKey, settings: &mut Vec<YamlLine>) -> Result<(), (u32, &'static str)> {
    match closed.items {
        Some(items) => settings.push((closed.line, closed.key, RawValue::List(items))),
        None if closed.child_indent.is_none() => {
            return Err((
                closed.line,
                "missing value (a key needs a value or a block below it)",
            ));
        }
        None => {}
    }
    Ok(())
}

/// Splits `key: value` at the first `:` followed by a space or the end of
/// the line, outside quotes (`jobmanager.rpc.address: jm:6123` has one).
fn split_key(line: &str) -> Option<(&str, &str)> {
    let bytes = line.as_bytes();
    let mut quote = None;
    for (i, &b) in bytes.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if (b == b'"' || b == b'\'') && i == 0 => quote = Some(b),
            None if b == b':' && bytes.get(i + 1).is_none_or(|&n| n == b' ' || n == b'\t') => {
                return Some((&line[..i], &line[i + 1..]));
            }
            None => {}
        }
    }
    // `a:1` has no `: `; report it as the missing space rather than no key.
    line.split_once(':')
}

/// A key as written, without the quotes around it, if any.
fn unquote_key(name: &str) -> Result<String, &'static str> {
    match name.chars().next() {
        Some(q @ ('"' | '\'')) => name
            .strip_prefix(q)
            .and_then(|rest| rest.strip_suffix(q))
            .map(str::to_owned)
            .ok_or("unterminated quoted key"),
        _ => Ok(name.to_owned()),
    }
}

/// `value` without a trailing ` # comment` (outside quotes; a value that
/// starts with a quote has its comment removed by [`scalar`]).
fn strip_comment(value: &str) -> &str {
    if value.starts_with(['"', '\'']) {
        return value;
    }
    if value.starts_with('#') {
        return "";
    }
    match value.find(" #").or_else(|| value.find("\t#")) {
        Some(comment) => value[..comment].trim_end(),
        None => value,
    }
}

/// One scalar value: plain, or in single or double quotes.
fn scalar(rest: &str) -> Result<String, &'static str> {
    let rest = rest.trim();
    if let Some(quote) = rest.chars().next().filter(|c| matches!(c, '"' | '\'')) {
        let body = &rest[1..];
        let end = body.find(quote).ok_or("unterminated quoted value")?;
        let tail = body[end + 1..].trim_start();
        if !tail.is_empty() && !tail.starts_with('#') {
            return Err("unexpected text after the closing quote");
        }
        return Ok(body[..end].to_owned());
    }
    let value = strip_comment(rest);
    match value.chars().next() {
        None => Err("missing value"),
        Some('[') => Err("a list inside a list is not supported"),
        Some('{') => Err("maps in flow style ({...}) are not supported; write a block"),
        Some('|' | '>') => Err("block scalars (| and >) are not supported"),
        Some('&' | '*' | '!') => Err("anchors, aliases and tags are not supported"),
        Some(_) => Ok(value.to_owned()),
    }
}

/// A list in flow style, `[a, 'b c', "d"]`, of scalars.
fn flow_list(value: &str) -> Result<Vec<String>, &'static str> {
    let body = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or("a list in flow style must end with `]` on the same line")?;
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut items = Vec::new();
    let mut item = String::new();
    let mut quote = None;
    for c in body.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                item.push(c);
            }
            (Some(_), c) => item.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                item.push(c);
            }
            (None, ',') => items.push(scalar(&std::mem::take(&mut item))?),
            (None, c) => item.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quoted value");
    }
    items.push(scalar(&item)?);
    Ok(items)
}

fn yaml_entries(lines: Vec<YamlLine>, origin: impl Fn(u32) -> Origin) -> Vec<Entry> {
    lines
        .into_iter()
        .map(|(line, key, value)| Entry {
            key,
            value,
            origin: origin(line),
        })
        .collect()
}

fn line_at(text: &str, offset: usize) -> u32 {
    let end = offset.min(text.len());
    let newlines = text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    u32::try_from(newlines + 1).unwrap_or(u32::MAX)
}

impl Origin {
    pub(super) const DEFAULT: Origin = Origin {
        source: ConfigSource::Default,
        line: None,
    };

    fn file(path: &Path, line: Option<u32>) -> Origin {
        Origin {
            source: ConfigSource::File(path.into()),
            line,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Env => f.write_str("STRATA_PROPERTIES"),
            ConfigSource::CommandLine => f.write_str("-D"),
            ConfigSource::Default => f.write_str("default"),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.line) {
            (ConfigSource::File(path), Some(line)) => write!(f, "{}:{line}", path.display()),
            (ConfigSource::Env, Some(line)) => write!(f, "STRATA_PROPERTIES line {line}"),
            (source, _) => source.fmt(f),
        }
    }
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Text(text) => f.write_str(text),
            RawValue::Integer(number) => number.fmt(f),
            RawValue::Float(number) => number.fmt(f),
            RawValue::Bool(flag) => flag.fmt(f),
            RawValue::List(items) => write!(f, "[{}]", items.join(", ")),
        }
    }
}

/// The settings of the `config.yaml` Flink 2 ships (without its comments).
#[cfg(test)]
pub(super) const FLINK_2_CONFIG_YAML: &str = "\
env:
  java:
    opts:
      all: --add-exports=java.base/sun.net.util=ALL-UNNAMED
jobmanager:
  bind-host: localhost
  rpc:
    address: localhost
    port: 6123
  memory:
    process:
      size: 1600m
  execution:
    failover-strategy: region

taskmanager:
  bind-host: localhost
  host: localhost
  # The number of task slots
  numberOfTaskSlots: 1
  memory:
    process:
      size: 1728m
parallelism:
  default: 1
rest:
  address: localhost
  bind-address: localhost
";

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_and_values(entries: &[Entry]) -> Vec<(String, RawValue)> {
        entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    }

    fn text(s: &str) -> RawValue {
        RawValue::Text(s.to_owned())
    }

    #[test]
    fn toml_nested_tables_and_dotted_keys_flatten_to_flink_keys() {
        let input = "heartbeat.interval = \"5 s\"\n\
                     taskmanager.numberOfTaskSlots = 4\n\
                     [taskmanager.memory]\n\
                     process.size = \"2g\"\n\
                     managed.fraction = 0.25\n\
                     [io.tmp]\n\
                     dirs = [\"/a\", \"/b\"]\n";
        let entries = parse_toml(input, Path::new("strata.toml")).unwrap();
        let mut flat = keys_and_values(&entries);
        flat.sort_by(|a, b| a.0.cmp(&b.0));
        let expected = vec![
            ("heartbeat.interval".to_owned(), text("5 s")),
            (
                "io.tmp.dirs".to_owned(),
                RawValue::List(vec!["/a".into(), "/b".into()]),
            ),
            (
                "taskmanager.memory.managed.fraction".to_owned(),
                RawValue::Float(0.25),
            ),
            ("taskmanager.memory.process.size".to_owned(), text("2g")),
            (
                "taskmanager.numberOfTaskSlots".to_owned(),
                RawValue::Integer(4),
            ),
        ];
        assert_eq!(flat, expected);
        let size = entries.iter().find(|e| e.key.ends_with("process.size"));
        assert_eq!(size.unwrap().origin.line, Some(4));
    }

    #[test]
    fn toml_list_of_non_strings_is_refused_with_its_line() {
        let error = parse_toml("\n\nio.tmp.dirs = [1, 2]\n", Path::new("x.toml")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("io.tmp.dirs"), "{message}");
        assert!(message.contains("x.toml:3"), "{message}");
        assert!(message.contains("[1, 2]"), "{message}");
    }

    fn yaml(input: &str) -> Vec<(u32, String, RawValue)> {
        parse_yaml(input).unwrap_or_else(|e| panic!("{input:?}: {e:?}"))
    }

    #[test]
    fn flat_yaml_reads_comments_blanks_and_quotes() {
        let input = "# Flink's config\n\
                     \n\
                     taskmanager.numberOfTaskSlots: 4\n\
                     taskmanager.host: \"10.0.0.7\"  # quoted\n\
                     jobmanager.rpc.address: 'jm:1'\n\
                     io.tmp.dirs: /a:/b # trailing comment\n";
        let expected = vec![
            (3, "taskmanager.numberOfTaskSlots".into(), text("4")),
            (4, "taskmanager.host".into(), text("10.0.0.7")),
            (5, "jobmanager.rpc.address".into(), text("jm:1")),
            (6, "io.tmp.dirs".into(), text("/a:/b")),
        ];
        assert_eq!(yaml(input), expected);
    }

    /// The `config.yaml` Flink 2 ships (its settings, not its comments):
    /// nested blocks flatten to the dotted keys of `flink-conf.yaml`.
    #[test]
    fn flink_2_nested_config_yaml_flattens_to_dotted_keys() {
        let input = FLINK_2_CONFIG_YAML;
        let got: Vec<(u32, String)> = yaml(input)
            .into_iter()
            .map(|(line, key, value)| (line, format!("{key}={value}")))
            .collect();
        let expected: Vec<(u32, String)> = [
            (
                4,
                "env.java.opts.all=--add-exports=java.base/sun.net.util=ALL-UNNAMED",
            ),
            (6, "jobmanager.bind-host=localhost"),
            (8, "jobmanager.rpc.address=localhost"),
            (9, "jobmanager.rpc.port=6123"),
            (12, "jobmanager.memory.process.size=1600m"),
            (14, "jobmanager.execution.failover-strategy=region"),
            (17, "taskmanager.bind-host=localhost"),
            (18, "taskmanager.host=localhost"),
            (20, "taskmanager.numberOfTaskSlots=1"),
            (23, "taskmanager.memory.process.size=1728m"),
            (25, "parallelism.default=1"),
            (27, "rest.address=localhost"),
            (28, "rest.bind-address=localhost"),
        ]
        .into_iter()
        .map(|(l, kv)| (l, kv.to_owned()))
        .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn yaml_mixes_dotted_keys_blocks_and_both_list_styles() {
        let input = "---\n\
                     taskmanager.memory:\n\
                     \x20 process.size: 2g   # a dotted key inside a block\n\
                     \x20 \"managed.fraction\": 0.5\n\
                     io.tmp.dirs:\n\
                     \x20 - /mnt/a\n\
                     \x20 - '/mnt/b # not a comment'\n\
                     pipeline.jars: [a.jar, 'b, c.jar', \"d.jar\"]\n\
                     empty.list: []\n\
                     rest.port: 8081\n";
        let expected = vec![
            (3, "taskmanager.memory.process.size".into(), text("2g")),
            (4, "taskmanager.memory.managed.fraction".into(), text("0.5")),
            (
                5,
                "io.tmp.dirs".into(),
                RawValue::List(vec!["/mnt/a".into(), "/mnt/b # not a comment".into()]),
            ),
            (
                8,
                "pipeline.jars".into(),
                RawValue::List(vec!["a.jar".into(), "b, c.jar".into(), "d.jar".into()]),
            ),
            (9, "empty.list".into(), RawValue::List(Vec::new())),
            (10, "rest.port".into(), text("8081")),
        ];
        assert_eq!(yaml(input), expected);
    }

    /// A list may sit at its key's own column, as kubectl writes YAML.
    #[test]
    fn yaml_lists_at_their_keys_column() {
        let input = "io:\n  tmp:\n    dirs:\n    - /a\n    - /b\n  backend: auto\nlast:\n- x\n";
        let expected = vec![
            (
                3,
                "io.tmp.dirs".into(),
                RawValue::List(vec!["/a".into(), "/b".into()]),
            ),
            (6, "io.backend".into(), text("auto")),
            (7, "last".into(), RawValue::List(vec!["x".into()])),
        ];
        assert_eq!(yaml(input), expected);
    }

    #[test]
    fn yaml_refuses_what_it_cannot_read_naming_the_line() {
        let cases = [
            ("a: 1\n  b: 2\n", 2),
            ("a:\n    b: 1\n  c: 2\n", 3),
            ("a: 1\n- x\n", 2),
            ("a:\n  - x\n  b: 1\n", 3),
            ("a:\n  b: 1\n  - x\n", 3),
            ("a:\nb: 1\n", 1),
            ("a:\n", 1),
            ("a: 1\n\nno colon here\n", 3),
            ("a:1\n", 1),
            ("a: \"open\n", 1),
            ("a: {b: 1}\n", 1),
            ("a: [x, y\n", 1),
            ("a: |\n  text\n", 1),
            ("a: &anchor 1\n", 1),
            ("a:\n\tb: 1\n", 2),
            ("a:\n  -x\n", 2),
        ];
        for (input, line) in cases {
            let (got, reason) = parse_yaml(input).unwrap_err();
            assert_eq!(got, line, "{input:?}: {reason}");
        }
    }

    proptest::proptest! {
        /// Whatever a file holds, the reader answers with settings or an
        /// error naming a line of it; it never panics.
        #[test]
        fn yaml_reader_never_panics(text in "([ a-z.:#'\"\\[\\],{}|&\t-]{0,12}\n){0,8}") {
            if let Err((line, _)) = parse_yaml(&text) {
                proptest::prop_assert!(line >= 1 && line as usize <= text.lines().count());
            }
        }

        /// Nested blocks give the same settings as their dotted flat form.
        #[test]
        fn nested_blocks_equal_their_flat_form(
            settings in proptest::collection::btree_map("[a-c]{1,2}(\\.[a-c]{1,2}){0,2}", "[x-z0-9]{1,3}", 1..6)
        ) {
            // Only keys none of which is a block of another.
            let blocks: Vec<String> = settings.keys().map(|k| format!("{k}.")).collect();
            let settings: std::collections::BTreeMap<String, String> = settings
                .into_iter()
                .filter(|(k, _)| !blocks.iter().any(|b| k.starts_with(b.as_str())))
                .collect();
            let flat: String = settings.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            let mut nested = String::new();
            for (key, value) in &settings {
                let parts: Vec<&str> = key.split('.').collect();
                for (depth, part) in parts.iter().enumerate() {
                    let indent = "  ".repeat(depth);
                    if depth + 1 == parts.len() {
                        nested.push_str(&format!("{indent}{part}: {value}\n"));
                    } else {
                        nested.push_str(&format!("{indent}{part}:\n"));
                    }
                }
            }
            let strip = |v: Vec<YamlLine>| -> Vec<(String, RawValue)> {
                let mut v: Vec<(String, RawValue)> = v.into_iter().map(|(_, k, v)| (k, v)).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            // A key repeated as a block header (`a:` twice) is read twice;
            // the settings, in key order, are the same.
            let flat = strip(parse_yaml(&flat).expect("flat"));
            let nested = strip(parse_yaml(&nested).expect("nested"));
            proptest::prop_assert_eq!(flat, nested);
        }
    }

    #[test]
    fn env_properties_errors_name_the_variable_and_line() {
        let error = parse_env_properties("a: 1\nbroken\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("STRATA_PROPERTIES line 2"), "{message}");
        let entries = parse_env_properties("taskmanager.host: h\n").unwrap();
        assert_eq!(entries[0].origin.to_string(), "STRATA_PROPERTIES line 1");
    }

    #[test]
    fn overrides_split_at_the_first_equals_sign() {
        let arguments = vec!["a.b=1".to_owned(), " c = x=y ".to_owned()];
        let entries = parse_overrides(&arguments).unwrap();
        assert_eq!(
            keys_and_values(&entries),
            vec![("a.b".to_owned(), text("1")), ("c".to_owned(), text("x=y"))]
        );
        assert_eq!(entries[0].origin.source, ConfigSource::CommandLine);
    }

    #[test]
    fn malformed_override_names_the_argument() {
        for argument in ["novalue", "=3", ""] {
            let error = parse_overrides(&[argument.to_owned()]).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, ConfigError::MalformedOverride { .. }));
            assert!(message.contains(&format!("`{argument}`")), "{message}");
            assert!(message.contains("key=value"), "{message}");
        }
    }

    #[test]
    fn unreadable_and_unparsable_files_name_the_path() {
        let missing = Path::new("/nonexistent/strata.toml");
        let message = read_file(missing).unwrap_err().to_string();
        assert!(message.contains("/nonexistent/strata.toml"), "{message}");

        let error = parse_toml("a = 1\nb = = 2\n", Path::new("bad.toml")).unwrap_err();
        assert!(matches!(
            error,
            ConfigError::FileParse { line: Some(2), .. }
        ));
        assert!(error.to_string().contains("bad.toml:2"), "{error}");

        let error = read_file(Path::new("strata.ini")).unwrap_err();
        assert!(error.to_string().contains("strata.ini"), "{error}");
    }
}
