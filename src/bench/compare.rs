//! `strata bench --compare A.json B.json`: the figures both reports hold,
//! matched by section, name and size, as B/A, flagged where the change is
//! beyond the noise.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::report::{Report, Unit, escape, html_page, render_columns, strip_xml_declaration};
use super::{BenchError, plot};

/// The default noise band: ±10 % (a loaded two-core VM varies that much
/// between quick runs).
pub const NOISE_DEFAULT: f64 = 0.10;

/// How B differs from A on one figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference {
    pub key: String,
    pub unit: Unit,
    pub a: f64,
    pub b: f64,
    /// `b / a`.
    pub ratio: f64,
    /// B's ratio to its reference over A's: the change with the drift of
    /// the machine itself (a loaded VM, a busier loopback) divided out,
    /// since each reference was measured beside its figure.
    pub ratio_to_reference: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the noise band.
    Same,
    Better,
    Worse,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Same => "",
            Verdict::Better => "better",
            Verdict::Worse => "WORSE",
        }
    }
}

/// The comparison of two reports.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub noise: f64,
    pub differences: Vec<Difference>,
    /// Figures only A has, and only B has.
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
}

/// Whether `ratio = b / a` is a change beyond `noise`, in which direction.
pub fn verdict(ratio: f64, unit: Unit, noise: f64) -> Verdict {
    if !ratio.is_finite() || (ratio - 1.0).abs() <= noise {
        return Verdict::Same;
    }
    if (ratio > 1.0) == unit.higher_is_better() {
        Verdict::Better
    } else {
        Verdict::Worse
    }
}

pub fn compare(a: &Report, b: &Report, noise: f64) -> Comparison {
    let index = |r: &Report| {
        r.run
            .figures
            .iter()
            .map(|f| (f.key(), (f.value, f.unit, f.ratio)))
            .collect::<BTreeMap<_, _>>()
    };
    let (in_a, in_b) = (index(a), index(b));
    let mut differences = Vec::new();
    let mut only_a = Vec::new();
    for figure in &a.run.figures {
        let key = figure.key();
        match in_b.get(&key) {
            Some(&(b_value, unit, b_ratio)) if unit == figure.unit => {
                let ratio = if figure.value > 0.0 {
                    b_value / figure.value
                } else {
                    f64::NAN
                };
                let ratio_to_reference = match (figure.ratio, b_ratio) {
                    (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                    _ => None,
                };
                differences.push(Difference {
                    verdict: verdict(ratio, unit, noise),
                    ratio_to_reference,
                    key,
                    unit,
                    a: figure.value,
                    b: b_value,
                    ratio,
                });
            }
            _ => only_a.push(key),
        }
    }
    let only_b = in_b
        .keys()
        .filter(|k| !in_a.contains_key(*k))
        .cloned()
        .collect();
    Comparison {
        noise,
        differences,
        only_a,
        only_b,
    }
}

impl Comparison {
    pub fn flagged_count(&self) -> usize {
        self.differences
            .iter()
            .filter(|d| d.verdict != Verdict::Same)
            .count()
    }

    pub fn render_table(&self) -> String {
        let headers = [
            "figure",
            "A",
            "B",
            "unit",
            "B/A",
            "flag",
            "vs reference B/A",
        ];
        let rows: Vec<[String; 7]> = self
            .differences
            .iter()
            .map(|d| {
                [
                    d.key.clone(),
                    d.unit.format(d.a),
                    d.unit.format(d.b),
                    d.unit.display().0.to_owned(),
                    format!("{:.3}", d.ratio),
                    d.verdict.label().to_owned(),
                    d.ratio_to_reference
                        .map_or_else(|| "-".into(), |r| format!("{r:.3}")),
                ]
            })
            .collect();
        let mut out = render_columns(&headers, &rows);
        for key in &self.only_a {
            let _ = writeln!(out, "{key}: only in A");
        }
        for key in &self.only_b {
            let _ = writeln!(out, "{key}: only in B");
        }
        let _ = writeln!(
            out,
            "{} figures compared, {} beyond ±{:.0}% noise",
            self.differences.len(),
            self.flagged_count(),
            self.noise * 100.0
        );
        out
    }

    pub fn ratio_svg(&self) -> Result<String, BenchError> {
        let ratios: Vec<(String, f64)> = self
            .differences
            .iter()
            .map(|d| (d.key.clone(), d.ratio))
            .collect();
        plot::ratio_svg("B / A per figure", &ratios)
    }

    /// The table and the ratio plot as one self-contained page.
    pub fn render_html(&self, a_name: &str, b_name: &str) -> Result<String, BenchError> {
        let mut body = format!(
            "<h1>strata bench: B / A</h1>\n<p>A: <code>{}</code>, B: <code>{}</code>, \
             noise ±{:.0}%</p>\n<table><tr><th>figure</th><th>A</th><th>B</th><th>unit</th>\
             <th>B/A</th><th>flag</th><th>vs reference B/A</th></tr>\n",
            escape(a_name),
            escape(b_name),
            self.noise * 100.0
        );
        for d in &self.differences {
            let _ = writeln!(
                body,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td>\
                 <td class=\"n\">{:.3}</td><td class=\"flag\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&d.key),
                d.unit.format(d.a),
                d.unit.format(d.b),
                escape(d.unit.display().0),
                d.ratio,
                d.verdict.label(),
                d.ratio_to_reference
                    .map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            );
        }
        body.push_str("</table>\n");
        if !self.differences.is_empty() {
            let svg = self.ratio_svg()?;
            let _ = writeln!(body, "<figure>{}</figure>", strip_xml_declaration(&svg));
        }
        Ok(html_page("strata bench comparison", &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn verdict_follows_the_unit_direction_outside_the_noise() {
        assert_eq!(verdict(1.05, Unit::BytesPerS, 0.1), Verdict::Same);
        assert_eq!(verdict(1.2, Unit::BytesPerS, 0.1), Verdict::Better);
        assert_eq!(verdict(0.8, Unit::RowsPerS, 0.1), Verdict::Worse);
        // A latency that grows is worse.
        assert_eq!(verdict(1.2, Unit::Seconds, 0.1), Verdict::Worse);
        assert_eq!(verdict(0.5, Unit::Seconds, 0.1), Verdict::Better);
        assert_eq!(verdict(f64::NAN, Unit::Seconds, 0.1), Verdict::Same);
    }

    #[test]
    fn comparing_a_report_with_itself_flags_nothing() {
        let report = sample_report();
        let comparison = compare(&report, &report, NOISE_DEFAULT);
        assert_eq!(comparison.differences.len(), report.run.figures.len());
        assert!(comparison.differences.iter().all(|d| d.ratio == 1.0));
        assert_eq!(comparison.flagged_count(), 0);
        assert!(comparison.only_a.is_empty() && comparison.only_b.is_empty());
    }

    #[test]
    fn ratios_are_b_over_a_and_unmatched_figures_are_listed() {
        let a = sample_report();
        let mut b = a.clone();
        b.run.figures[1].value *= 2.0; // filter at 8192 rows: twice as fast
        b.run.figures[1].ratio = b.run.figures[1].ratio.map(|r| r * 2.0);
        b.run.figures.remove(0);
        let comparison = compare(&a, &b, NOISE_DEFAULT);
        let doubled = comparison
            .differences
            .iter()
            .find(|d| d.key == "cpu/operator filter @rows=8192")
            .unwrap();
        assert_eq!(doubled.ratio, 2.0);
        assert_eq!(doubled.verdict, Verdict::Better);
        // B's reference did not move, so its ratio to it doubled too.
        let to_reference = doubled.ratio_to_reference.unwrap();
        assert!((to_reference - 2.0).abs() < 1e-12, "{to_reference}");
        assert_eq!(comparison.only_a, vec!["cpu/operator filter @rows=1024"]);
        let table = comparison.render_table();
        assert!(
            table.contains("2.000") && table.contains("better"),
            "{table}"
        );
        assert!(table.contains("only in A"), "{table}");
        let html = comparison.render_html("a.json", "b.json").unwrap();
        assert!(html.contains("<svg") && html.contains("a.json"));
    }
}
