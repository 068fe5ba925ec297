//! The transfer bench's table as an SVG bar chart: one group per workload, one bar per
//! row, its length the row's speed against the TCP copy of the same run (the ratio the
//! table reports), so a reader sees at a glance where barge stands against each
//! baseline. Plain SVG text, no dependency: the picture is shown in benches/README.md.

use std::fmt::Write;

/// One bar: a row's label, its speed against the first row (tcp) and its MB/s.
pub struct Bar {
    pub label: &'static str,
    pub ratio: f64,
    pub mbps: f64,
}

/// One workload's bars, under its title.
pub struct Group {
    pub title: String,
    pub bars: Vec<Bar>,
}

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 250.0;
const BAR_H: f64 = 18.0;
const GAP: f64 = 4.0;
const TITLE_H: f64 = 26.0;

/// The chart of `groups`, with `caption` (what ran, when) under the title.
pub fn svg(groups: &[Group], caption: &str) -> String {
    let max = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.ratio))
        .fold(1.0f64, f64::max)
        .ceil();
    let plot_w = WIDTH - LABEL_W - 130.0;
    let x = |ratio: f64| LABEL_W + plot_w * ratio / max;
    let rows: usize = groups.iter().map(|g| g.bars.len()).sum();
    let height = 60.0 + groups.len() as f64 * TITLE_H + rows as f64 * (BAR_H + GAP) + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">barge against its baselines: speed relative to a TCP copy (1.0x)</text>"#
    );
    let _ = writeln!(s, r#"<text x="10" y="38" fill="dimgray">{}</text>"#, escape(caption));
    let mut y = 60.0;
    for g in groups {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 14.0,
            escape(&g.title)
        );
        y += TITLE_H;
        for b in &g.bars {
            let fill = if b.label.starts_with("barge") {
                "#1f6fb2"
            } else {
                "#9a9a9a"
            };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                y + 13.0,
                escape(b.label)
            );
            let w = (x(b.ratio) - LABEL_W).max(1.0);
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{fill}"/>"#
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{:.2}x · {:.0} MB/s</text>"#,
                LABEL_W + w + 6.0,
                y + 13.0,
                b.ratio,
                b.mbps
            );
            y += BAR_H + GAP;
        }
    }
    let one = x(1.0);
    let _ = writeln!(
        s,
        r#"<line x1="{one:.1}" y1="52" x2="{one:.1}" y2="{y}" stroke="black" stroke-dasharray="4 3"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{one:.1}" y="{}" text-anchor="middle">tcp = 1.0x</text>"#,
        y + 16.0
    );
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
