//! Where raw `key → value` entries come from: TOML files, flat YAML files, the
//! `STRATA_PROPERTIES` variable and `-D key=value` arguments.
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

/// Reads a `.toml` file, or a `.yaml`/`.yml` file in Flink's flat `key: value` form.
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
    let lines = parse_flat(&text).map_err(|(line, reason)| ConfigError::FileParse {
        path: path.into(),
        line: Some(line),
        message: reason.to_owned(),
    })?;
    Ok(flat_entries(lines, |line| Origin::file(path, Some(line))))
}

/// Parses `STRATA_PROPERTIES`: newline-separated `key: value` lines, as Flink's
/// `FLINK_PROPERTIES`.
pub(super) fn parse_env_properties(text: &str) -> Result<Vec<Entry>, ConfigError> {
    let lines =
        parse_flat(text).map_err(|(line, reason)| ConfigError::PropertiesParse { line, reason })?;
    Ok(flat_entries(lines, |line| Origin {
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

/// One `key: value` line: (line number, key, value).
type FlatLine = (u32, String, String);

/// Parses Flink's flat YAML: `key: value` lines, `#` comments, blank lines and
/// optional quotes around values. Nested blocks, lists and flow collections are
/// refused rather than misread.
fn parse_flat(text: &str) -> Result<Vec<FlatLine>, (u32, &'static str)> {
    let mut lines = Vec::new();
    for (number, line) in (1u32..).zip(text.lines()) {
        let content = line.trim_end();
        let unindented = content.trim_start();
        if unindented.is_empty() || unindented.starts_with('#') {
            continue;
        }
        if unindented.len() != content.len() {
            return Err((
                number,
                "nested blocks are not supported; write the full dotted key",
            ));
        }
        if unindented.starts_with('-') {
            return Err((number, "lists are not supported; write `key: value`"));
        }
        let (key, rest) = content
            .split_once(':')
            .ok_or((number, "expected `key: value`"))?;
        if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
            return Err((number, "expected a space after `:` in `key: value`"));
        }
        let value = flat_value(rest).map_err(|reason| (number, reason))?;
        lines.push((number, key.trim_end().to_owned(), value));
    }
    Ok(lines)
}

fn flat_value(rest: &str) -> Result<String, &'static str> {
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
    let value = match rest.find(" #").or_else(|| rest.find("\t#")) {
        Some(comment) => rest[..comment].trim_end(),
        None => rest,
    };
    match value.chars().next() {
        None => Err("missing value (nested blocks are not supported)"),
        Some('[' | '{' | '|' | '>' | '&' | '*') => {
            Err("lists, maps, block scalars and anchors are not supported")
        }
        Some(_) => Ok(value.to_owned()),
    }
}

fn flat_entries(lines: Vec<FlatLine>, origin: impl Fn(u32) -> Origin) -> Vec<Entry> {
    lines
        .into_iter()
        .map(|(line, key, value)| Entry {
            key,
            value: RawValue::Text(value),
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

    #[test]
    fn flat_yaml_reads_comments_blanks_and_quotes() {
        let input = "# Flink's config\n\
                     \n\
                     taskmanager.numberOfTaskSlots: 4\n\
                     taskmanager.host: \"10.0.0.7\"  # quoted\n\
                     jobmanager.rpc.address: 'jm:1'\n\
                     io.tmp.dirs: /a:/b # trailing comment\n";
        let lines = parse_flat(input).unwrap();
        let expected: Vec<FlatLine> = vec![
            (3, "taskmanager.numberOfTaskSlots".into(), "4".into()),
            (4, "taskmanager.host".into(), "10.0.0.7".into()),
            (5, "jobmanager.rpc.address".into(), "jm:1".into()),
            (6, "io.tmp.dirs".into(), "/a:/b".into()),
        ];
        assert_eq!(lines, expected);
    }

    #[test]
    fn flat_yaml_refuses_nesting_and_lists_naming_the_line() {
        let cases = [
            ("taskmanager:\n  numberOfTaskSlots: 4\n", 1),
            ("a: 1\n  b: 2\n", 2),
            ("a: 1\n- x\n", 2),
            ("io.tmp.dirs: [/a, /b]\n", 1),
            ("a: 1\n\nno colon here\n", 3),
            ("a:1\n", 1),
            ("a: \"open\n", 1),
        ];
        for (input, line) in cases {
            let (got, _) = parse_flat(input).unwrap_err();
            assert_eq!(got, line, "{input:?}");
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
