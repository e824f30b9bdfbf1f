//! A minimal tabwriter with Go's `text/tabwriter` semantics for our uniform tables: every
//! tab-terminated cell is padded to its column's width plus `padding`; the last cell of a row
//! is printed as is. With `debug`, a `|` follows each padded cell (as `tabwriter.Debug`).

pub fn render(rows: &[String], padding: usize, debug: bool) -> String {
    let split: Vec<Vec<&str>> = rows.iter().map(|r| r.split('\t').collect()).collect();
    let ncols = split
        .iter()
        .map(|r| r.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for r in &split {
        for (i, c) in r.iter().take(r.len().saturating_sub(1)).enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &split {
        let last = r.len().saturating_sub(1);
        for (i, c) in r.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(c);
                let pad = widths[i] + padding - c.chars().count();
                out.extend(std::iter::repeat_n(' ', pad));
                if debug {
                    out.push('|');
                }
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns() {
        let rows = vec!["a\tbb\tx".to_string(), "ccc\td\ty".to_string()];
        assert_eq!(render(&rows, 1, false), "a   bb x\nccc d  y\n");
        assert_eq!(render(&rows, 1, true), "a   |bb |x\nccc |d  |y\n");
    }
}
