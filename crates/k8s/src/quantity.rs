//! Kubernetes resource quantities (`"500m"`, `"0.5"`, `"100Mi"`, `"1G"`), as numbers: CPU in
//! millicores, memory in bytes. Only what capacity checks need: the API's canonical forms and
//! what users write in `testplan_pod_cpu` / `testplan_pod_memory`.

/// `s` in millicores (`"2"` → 2000, `"250m"` → 250, `"0.5"` → 500).
pub fn cpu_millis(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u64>().ok();
    }
    if let Some(n) = s.strip_suffix('n') {
        return n.parse::<u64>().ok().map(|n| n.div_ceil(1_000_000));
    }
    if let Some(u) = s.strip_suffix('u') {
        return u.parse::<u64>().ok().map(|u| u.div_ceil(1_000));
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * 1000.0).ceil() as u64)
}

/// `s` in bytes (`"128Mi"`, `"1G"`, `"1e3"`, `"512"`).
pub fn bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    const SUFFIXES: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
        ("m", 0), // milli-bytes: rounded up below
    ];
    for (suffix, mult) in SUFFIXES {
        if let Some(num) = s.strip_suffix(suffix) {
            let v: f64 = num.parse().ok()?;
            if !(v.is_finite() && v >= 0.0) {
                return None;
            }
            if *mult == 0 {
                return Some((v / 1000.0).ceil() as u64);
            }
            return Some((v * *mult as f64).ceil() as u64);
        }
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| v.ceil() as u64)
}

/// `bytes` for humans: `"1.5 GiB"`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Millicores for humans: `"1.5"` CPUs.
pub fn human_cpu(m: u64) -> String {
    if m.is_multiple_of(1000) {
        format!("{}", m / 1000)
    } else {
        format!("{:.3}", m as f64 / 1000.0)
            .trim_end_matches('0')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(cpu_millis("0.0001"), Some(1));
        assert_eq!(cpu_millis("1500000n"), Some(2));
        assert_eq!(cpu_millis("lots"), None);
        assert_eq!(cpu_millis("-1"), None);
        assert_eq!(human_cpu(1500), "1.5");
        assert_eq!(human_cpu(2000), "2");
    }

    #[test]
    fn memory() {
        assert_eq!(bytes("128Mi"), Some(128 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(bytes("512"), Some(512));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(bytes("16374140Ki"), Some(16_374_140 * 1024));
        assert_eq!(bytes("100x"), None);
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
