//! Spanned, typed access to a parsed TOML table.
//!
//! `toml::de::DeTable` keeps the byte span of every key and value; these helpers
//! turn a missing key, a wrong type or an unknown key into a [`JobError`] located
//! at the line of the offending value, so the spec parser never handles spans.

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{JobError, Location, Scope, SourceLines};

/// The job file: its name for messages and its text for turning offsets into lines.
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    pub fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// 1-based column (in characters) of a byte offset.
    pub fn column(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        let start = self.text.as_bytes()[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        String::from_utf8_lossy(&self.text.as_bytes()[start..end])
            .chars()
            .count()
            + 1
    }

    pub fn at(&self, span: &Range<usize>) -> Location {
        Location {
            file: self.file.to_path_buf(),
            line: self.line(span.start),
        }
    }

    /// Wraps `error` with the location of `span` and the scope it belongs to.
    pub fn error(&self, span: &Range<usize>, scope: &Scope, error: JobError) -> JobError {
        JobError::At {
            at: self.at(span),
            scope: scope.clone(),
            error: Box::new(error),
        }
    }
}

/// A TOML table plus what is needed to report errors in it.
pub(super) struct Table<'a, 'i> {
    pub source: Source<'a>,
    pub table: &'a DeTable<'i>,
    pub span: Range<usize>,
    pub scope: Scope,
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn error(&self, span: &Range<usize>, error: JobError) -> JobError {
        self.source.error(span, &self.scope, error)
    }

    pub fn get(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.table.get(key)
    }

    fn wrong_type(
        &self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        expected: &'static str,
    ) -> JobError {
        let error = JobError::WrongType {
            key: key.to_string(),
            expected,
            found: value.get_ref().type_str(),
        };
        self.error(&value.span(), error)
    }

    pub fn invalid(
        &self,
        key: &str,
        span: &Range<usize>,
        value: String,
        expected: &str,
    ) -> JobError {
        let error = JobError::InvalidValue {
            key: key.to_string(),
            value,
            expected: expected.to_string(),
        };
        self.error(span, error)
    }

    pub fn missing(&self, key: &str, expected: &'static str) -> JobError {
        let error = JobError::MissingKey {
            key: key.to_string(),
            expected,
        };
        self.error(&self.span, error)
    }

    pub fn str(&self, key: &str) -> Result<Option<Spanned<&'a str>>, JobError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.get_ref().as_str() {
            Some(s) => Ok(Some(Spanned::new(value.span(), s))),
            None => Err(self.wrong_type(key, value, "a string")),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<Spanned<&'a str>, JobError> {
        self.str(key)?.ok_or_else(|| self.missing(key, "a string"))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, JobError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.get_ref().as_bool() {
            Some(b) => Ok(Some(b)),
            None => Err(self.wrong_type(key, value, "a boolean")),
        }
    }

    /// An integer in `min..=max`; TOML integers may use `_`, hex, octal or binary.
    pub fn int(&self, key: &str, min: i128, max: i128) -> Result<Option<Spanned<i128>>, JobError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let Some(int) = value.get_ref().as_integer() else {
            return Err(self.wrong_type(key, value, "an integer"));
        };
        let digits = int.as_str().replace('_', "");
        let parsed = i128::from_str_radix(&digits, int.radix())
            .ok()
            .filter(|n| (min..=max).contains(n));
        match parsed {
            Some(n) => Ok(Some(Spanned::new(value.span(), n))),
            None => Err(self.invalid(
                key,
                &value.span(),
                digits,
                &format!("an integer between {min} and {max}"),
            )),
        }
    }

    pub fn u64(&self, key: &str, min: u64) -> Result<Option<u64>, JobError> {
        let n = self.int(key, i128::from(min), i128::from(u64::MAX))?;
        Ok(n.and_then(|n| u64::try_from(n.into_inner()).ok()))
    }

    pub fn i64(&self, key: &str, min: i64) -> Result<Option<i64>, JobError> {
        let n = self.int(key, i128::from(min), i128::from(i64::MAX))?;
        Ok(n.and_then(|n| i64::try_from(n.into_inner()).ok()))
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a [Spanned<DeValue<'i>>]>, JobError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.get_ref().as_array() {
            Some(items) => Ok(Some(items.as_ref())),
            None => Err(self.wrong_type(key, value, "an array")),
        }
    }

    pub fn str_array(&self, key: &str) -> Result<Option<Vec<Spanned<&'a str>>>, JobError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        let strings = items
            .iter()
            .enumerate()
            .map(|(index, item)| match item.get_ref().as_str() {
                Some(s) => Ok(Spanned::new(item.span(), s)),
                None => Err(self.wrong_type(&format!("{key}[{index}]"), item, "a string")),
            });
        strings.collect::<Result<Vec<_>, _>>().map(Some)
    }

    pub fn table(&self, key: &str) -> Result<Option<Table<'a, 'i>>, JobError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.get_ref().as_table() {
            Some(table) => Ok(Some(Table {
                source: self.source,
                table,
                span: value.span(),
                scope: self.scope.clone(),
            })),
            None => Err(self.wrong_type(key, value, "a table")),
        }
    }

    /// Entries in file order (the map itself may be sorted by key).
    pub fn entries(
        &self,
    ) -> Vec<(
        &'a Spanned<toml::de::DeString<'i>>,
        &'a Spanned<DeValue<'i>>,
    )> {
        let mut entries: Vec<_> = self.table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        entries
    }

    /// Rejects the first key (in file order) not in `allowed`, suggesting the closest.
    pub fn check_keys(&self, allowed: &[&'static str], table: &str) -> Result<(), JobError> {
        let unknown = self
            .entries()
            .into_iter()
            .find(|(key, _)| !allowed.contains(&key.get_ref().as_ref()));
        let Some((key, _)) = unknown else {
            return Ok(());
        };
        let error = JobError::UnknownKey {
            key: key.get_ref().to_string(),
            table: table.to_string(),
            suggestion: closest(key.get_ref(), allowed).map(str::to_string),
            allowed: allowed.to_vec(),
        };
        Err(self.error(&key.span(), error))
    }

    /// The line of every value, and of every element of array values.
    pub fn lines(&self) -> SourceLines {
        let mut lines = SourceLines::default();
        for (key, value) in self.entries() {
            let items = value.get_ref().as_array().map_or_else(Vec::new, |items| {
                items
                    .iter()
                    .map(|item| self.source.line(item.span().start))
                    .collect()
            });
            lines.insert(key.get_ref(), self.source.line(value.span().start), items);
        }
        lines
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a
/// plausible typo (at most two edits, or a third of the candidate's length).
pub(super) fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("predicat", "predicate"), 1);
        assert_eq!(edit_distance("fliter", "filter"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn closest_ignores_candidates_that_are_too_far() {
        assert_eq!(closest("fliter", &["filter", "project"]), Some("filter"));
        assert_eq!(closest("zzzzzz", &["filter", "project"]), None);
    }

    #[test]
    fn line_and_column_are_one_based() {
        let source = Source {
            file: Path::new("x.toml"),
            text: "a = 1\nbé = 2\n",
        };
        assert_eq!(source.line(0), 1);
        assert_eq!(source.line(6), 2);
        assert_eq!(source.column(6), 1);
        assert_eq!(source.column(10), 4);
    }
}
