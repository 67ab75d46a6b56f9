//! The results of one `strata bench` run: figures beside their references,
//! the terminal table, the JSON file (versioned, with the machine it ran
//! on) and the self-contained HTML report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::machine::MachineInfo;
use super::{BenchError, Section, plot};

/// The JSON schema's version; a reader refuses any other.
pub const SCHEMA_VERSION: u32 = 1;

/// What a value counts. Values are stored in base units (bytes, rows,
/// seconds); the table scales them for reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    BytesPerS,
    RowsPerS,
    /// Seconds per operation (a latency or a per-page cost).
    Seconds,
    /// A dimensionless ratio (speed-up of many threads over one).
    Times,
}

impl Unit {
    /// The unit as the table prints it, and the factor a value is divided by.
    pub fn display(self) -> (&'static str, f64) {
        match self {
            Unit::BytesPerS => ("GB/s", 1e9),
            Unit::RowsPerS => ("M rows/s", 1e6),
            Unit::Seconds => ("µs", 1e-6),
            Unit::Times => ("x", 1.0),
        }
    }

    /// Whether a larger value is better (throughput) or worse (latency).
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Unit::Seconds)
    }

    pub fn format(self, value: f64) -> String {
        let (_, factor) = self.display();
        let scaled = value / factor;
        if scaled.abs() >= 100.0 {
            format!("{scaled:.0}")
        } else if scaled.abs() >= 1.0 {
            format!("{scaled:.2}")
        } else {
            format!("{scaled:.3}")
        }
    }
}

/// The x of a throughput-vs-size plot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    /// Rows per batch.
    Rows(u64),
    /// Bytes per message, block or copy.
    Bytes(u64),
}

impl Size {
    pub fn value(self) -> u64 {
        match self {
            Size::Rows(n) | Size::Bytes(n) => n,
        }
    }

    pub fn axis_label(self) -> &'static str {
        match self {
            Size::Rows(_) => "rows per batch",
            Size::Bytes(_) => "bytes per message/block",
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Size::Rows(n) => write!(f, "rows={n}"),
            Size::Bytes(n) if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            Size::Bytes(n) if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            Size::Bytes(n) => write!(f, "{n}B"),
        }
    }
}

/// The physical reference a figure is a ratio to, measured in the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub name: String,
    pub value: f64,
    pub unit: Unit,
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub section: Section,
    /// What was measured, e.g. `operator filter` or `shuffle tcp`.
    pub name: String,
    pub size: Option<Size>,
    pub value: f64,
    pub unit: Unit,
    pub reference: Option<Reference>,
    /// `value / reference.value`, when there is a reference.
    pub ratio: Option<f64>,
    /// The plot this figure is a point of (figures of one name form a line).
    pub plot: Option<String>,
}

impl Figure {
    pub fn new(section: Section, name: impl Into<String>, value: f64, unit: Unit) -> Self {
        Figure {
            section,
            name: name.into(),
            size: None,
            value,
            unit,
            reference: None,
            ratio: None,
            plot: None,
        }
    }

    pub fn at(mut self, size: Size) -> Self {
        self.size = Some(size);
        self
    }

    pub fn plotted(mut self, plot: &str) -> Self {
        self.plot = Some(plot.to_owned());
        self
    }

    pub fn against(mut self, name: impl Into<String>, value: f64, unit: Unit) -> Self {
        self.ratio = (value > 0.0 && value.is_finite()).then(|| self.value / value);
        self.reference = Some(Reference {
            name: name.into(),
            value,
            unit,
        });
        self
    }

    /// Identifies the figure across runs: section, name and size.
    pub fn key(&self) -> String {
        match self.size {
            Some(size) => format!("{}/{} @{size}", self.section, self.name),
            None => format!("{}/{}", self.section, self.name),
        }
    }
}

/// A figure that could not be measured here, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub section: Section,
    pub name: String,
    pub reason: String,
}

/// How the run was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub quick: bool,
    pub size_scale: f64,
    pub sections: Vec<Section>,
    pub peer: Option<String>,
    pub dir: PathBuf,
    pub elapsed_s: f64,
    pub figures: Vec<Figure>,
    pub skipped: Vec<Skipped>,
}

/// The whole JSON file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub machine: MachineInfo,
    pub run: RunInfo,
}

impl Report {
    pub fn new(run: RunInfo) -> Self {
        Report {
            schema_version: SCHEMA_VERSION,
            machine: MachineInfo::probe(),
            run,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).map_err(|source| BenchError::Json {
            path: path.to_owned(),
            source,
        })?;
        write_file(path, text.as_bytes())
    }

    pub fn read_json(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::File {
            what: "reading report",
            path: path.to_owned(),
            source,
        })?;
        let json = |source| BenchError::Json {
            path: path.to_owned(),
            source,
        };
        // The version first, so that a newer file is refused by name, not by
        // whichever field moved.
        let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
        let found = value
            .get("schema_version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        if found != SCHEMA_VERSION {
            return Err(BenchError::SchemaVersion {
                path: path.to_owned(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        serde_json::from_value(value).map_err(json)
    }

    /// The terminal table: one line per figure, grouped by section, then the
    /// skipped lines.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.machine.describe());
        let headers = ["figure", "value", "unit", "reference", "ref value", "ratio"];
        let mut rows: Vec<[String; 6]> = Vec::new();
        for figure in &self.run.figures {
            let name = match figure.size {
                Some(size) => format!("{}/{} @{size}", figure.section, figure.name),
                None => format!("{}/{}", figure.section, figure.name),
            };
            let (unit, _) = figure.unit.display();
            let (reference, reference_value) = match &figure.reference {
                Some(r) => (
                    r.name.clone(),
                    format!("{} {}", r.unit.format(r.value), r.unit.display().0),
                ),
                None => ("-".into(), "-".into()),
            };
            let ratio = figure
                .ratio
                .map_or_else(|| "-".into(), |r| format!("{r:.3}"));
            rows.push([
                name,
                figure.unit.format(figure.value),
                unit.to_owned(),
                reference,
                reference_value,
                ratio,
            ]);
        }
        out.push_str(&render_columns(&headers, &rows));
        for skipped in &self.run.skipped {
            let _ = writeln!(
                out,
                "{}/{}: skipped: {}",
                skipped.section, skipped.name, skipped.reason
            );
        }
        let _ = writeln!(
            out,
            "{} figures, {} skipped, {:.1} s{}",
            self.run.figures.len(),
            self.run.skipped.len(),
            self.run.elapsed_s,
            if self.run.quick { " (--quick)" } else { "" }
        );
        out
    }

    /// The plots of this run: (plot id, SVG text), in plot order.
    pub fn plots(&self) -> Result<Vec<(String, String)>, BenchError> {
        let mut groups: BTreeMap<&str, Vec<&Figure>> = BTreeMap::new();
        for figure in &self.run.figures {
            if let (Some(plot), Some(_)) = (&figure.plot, figure.size) {
                groups.entry(plot).or_default().push(figure);
            }
        }
        groups
            .into_iter()
            .map(|(id, figures)| Ok((id.to_owned(), plot::throughput_svg(id, &figures)?)))
            .collect()
    }

    /// Writes every plot as `<dir>/<plot>.svg`; returns the paths.
    pub fn write_plots(&self, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::File {
            what: "creating plot directory",
            path: dir.to_owned(),
            source,
        })?;
        self.plots()?
            .into_iter()
            .map(|(id, svg)| {
                let path = dir.join(format!("{id}.svg"));
                write_file(&path, svg.as_bytes())?;
                Ok(path)
            })
            .collect()
    }

    /// One self-contained HTML page: the machine, the table per section,
    /// the skipped lines and every plot inline. No external resources.
    pub fn render_html(&self) -> Result<String, BenchError> {
        let mut body = String::new();
        let _ = writeln!(
            body,
            "<h1>strata bench</h1>\n<p>{}</p>",
            escape(&self.machine.describe())
        );
        let _ = writeln!(
            body,
            "<p>{}{} figures, {:.1} s; storage in <code>{}</code>; network peer: {}</p>",
            if self.run.quick { "quick run, " } else { "" },
            self.run.figures.len(),
            self.run.elapsed_s,
            escape(&self.run.dir.display().to_string()),
            escape(self.run.peer.as_deref().unwrap_or("loopback")),
        );
        for section in &self.run.sections {
            let figures: Vec<&Figure> = self
                .run
                .figures
                .iter()
                .filter(|f| f.section == *section)
                .collect();
            let _ = writeln!(body, "<h2>{section}</h2>");
            if !figures.is_empty() {
                body.push_str(&html_table(&figures));
            }
            for skipped in self.run.skipped.iter().filter(|s| s.section == *section) {
                let _ = writeln!(
                    body,
                    "<p class=\"skip\">{}: skipped: {}</p>",
                    escape(&skipped.name),
                    escape(&skipped.reason)
                );
            }
        }
        let plots = self.plots()?;
        if !plots.is_empty() {
            body.push_str("<h2>plots</h2>\n");
            for (id, svg) in plots {
                let _ = writeln!(
                    body,
                    "<figure><figcaption>{}</figcaption>{}</figure>",
                    escape(&id),
                    strip_xml_declaration(&svg)
                );
            }
        }
        Ok(html_page("strata bench", &body))
    }
}

fn html_table(figures: &[&Figure]) -> String {
    let mut out = String::from(
        "<table><tr><th>figure</th><th>size</th><th>value</th><th>unit</th>\
         <th>reference</th><th>ref value</th><th>ratio</th></tr>\n",
    );
    for f in figures {
        let (reference, reference_value) = match &f.reference {
            Some(r) => (
                r.name.clone(),
                format!("{} {}", r.unit.format(r.value), r.unit.display().0),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&f.name),
            f.size.map_or_else(String::new, |s| s.to_string()),
            f.unit.format(f.value),
            escape(f.unit.display().0),
            escape(&reference),
            escape(&reference_value),
            f.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
        );
    }
    out.push_str("</table>\n");
    out
}

/// A page with its style inline.
pub(super) fn html_page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; }}\n\
         table {{ border-collapse: collapse; margin-bottom: 1em; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}\n\
         td.n {{ text-align: right; font-family: monospace; }}\n\
         .skip {{ color: #885; }} .flag {{ color: #b00; font-weight: bold; }}\n\
         figure {{ display: inline-block; margin: 1em; }}\n\
         </style></head><body>\n{}</body></html>\n",
        escape(title),
        body
    )
}

/// The SVG element without its `<?xml ...?>` line, to inline in HTML.
pub(super) fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(start) => &svg[start..],
        None => svg,
    }
}

pub(super) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Left-aligned text columns, right-aligned numbers, padded to the widest
/// cell.
pub(super) fn render_columns<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let numeric = |cell: &str| cell.starts_with(|c: char| c.is_ascii_digit());
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            if i > 0 && numeric(cell) {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &headers.map(str::to_owned));
    for row in rows {
        line(&mut out, row);
    }
    out
}

pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BenchError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| BenchError::File {
            what: "creating directory",
            path: parent.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, bytes).map_err(|source| BenchError::File {
        what: "writing",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A small report with a plotted series, a reference and a skipped line.
    pub(crate) fn sample_report() -> Report {
        let mut figures = Vec::new();
        for (rows, rate) in [(1024u64, 2e8), (8192, 3e8), (65536, 3.5e8)] {
            figures.push(
                Figure::new(Section::Cpu, "operator filter", rate, Unit::RowsPerS)
                    .at(Size::Rows(rows))
                    .plotted("cpu-operators")
                    .against("memcpy of the same bytes", 1e9, Unit::RowsPerS),
            );
        }
        figures.push(
            Figure::new(Section::Memory, "first touch", 250e-9, Unit::Seconds).against(
                "4 KiB copy",
                500e-9,
                Unit::Seconds,
            ),
        );
        Report::new(RunInfo {
            quick: true,
            size_scale: 1.0,
            sections: vec![Section::Memory, Section::Cpu, Section::Gpu],
            peer: None,
            dir: PathBuf::from("/tmp"),
            elapsed_s: 1.5,
            figures,
            skipped: vec![Skipped {
                section: Section::Gpu,
                name: "gpu".into(),
                reason: "no GPU (<no driver>)".into(),
            }],
        })
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let report = sample_report();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/report.json");
        report.write_json(&path).unwrap();
        let back = Report::read_json(&path).unwrap();
        assert_eq!(back, report);
        let text = std::fs::read_to_string(&path).unwrap();
        for field in [
            "\"schema_version\": 1",
            "hostname",
            "cpu_model",
            "kernel",
            "cores",
        ] {
            assert!(text.contains(field), "{field} missing in {text}");
        }
    }

    #[test]
    fn a_report_of_another_schema_version_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.json");
        std::fs::write(&path, r#"{"schema_version": 99, "machine": {}}"#).unwrap();
        let error = Report::read_json(&path).unwrap_err().to_string();
        assert!(
            error.contains("old.json") && error.contains("99"),
            "{error}"
        );
        let missing = Report::read_json(&dir.path().join("none.json")).unwrap_err();
        assert!(missing.to_string().contains("none.json"), "{missing}");
    }

    #[test]
    fn table_has_one_line_per_figure_with_ratio_and_the_skipped_reason() {
        let table = sample_report().render_table();
        assert!(
            table.lines().nth(1).unwrap().starts_with("figure"),
            "{table}"
        );
        let filter = table
            .lines()
            .find(|l| l.starts_with("cpu/operator filter @rows=8192"))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(filter.contains("300"), "{filter}");
        assert!(filter.contains("M rows/s"), "{filter}");
        assert!(filter.trim_end().ends_with("0.300"), "{filter}");
        assert!(table.contains("memory/first touch"), "{table}");
        assert!(table.contains("gpu/gpu: skipped: no GPU"), "{table}");
    }

    #[test]
    fn html_report_inlines_the_plots_and_loads_nothing_from_outside() {
        let html = sample_report().render_html().unwrap();
        assert!(html.contains("<svg"), "no inline plot");
        assert!(html.contains("cpu-operators"));
        assert!(html.contains("&lt;no driver&gt;"), "reason not escaped");
        assert!(!html.contains("<?xml"));
        for external in ["http://", "https://", "src=", "<link", "<script"] {
            // The SVG namespace is an identifier, not a resource.
            let without_namespace = html.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !without_namespace.contains(external),
                "external reference {external}"
            );
        }
    }

    #[test]
    fn plots_are_written_one_svg_per_plot() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sample_report().write_plots(dir.path()).unwrap();
        assert_eq!(paths.len(), 1);
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("operator filter"),
            "{svg}"
        );
    }
}
