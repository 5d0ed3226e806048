//! The valid range of every migration knob, checked where a migration starts (whoever sent
//! the request: the CLI checks the same ranges first, through [`parse`]).

use super::MigrateOptions;

/// A knob outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("--{flag} {value}: {range}")]
pub struct InvalidOption {
    /// The command-line flag.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// The valid range, in words.
    pub range: &'static str,
}

/// `--max-downtime`, ms.
pub const MAX_DOWNTIME_MS: (f64, f64) = (0.1, 600_000.0);
/// `--max-rounds`.
pub const MAX_ROUNDS: (u32, u32) = (1, 100_000);
/// `--bandwidth`, MiB/s.
pub const BANDWIDTH_MIBS: (f64, f64) = (0.01, 1_048_576.0);
/// `--timeout`, s.
pub const TIMEOUT_S: (u64, u64) = (1, 7 * 86_400);
/// `--converge-threshold`.
pub const CONVERGE_THRESHOLD: (f64, f64) = (0.01, 100.0);
/// `--min-rounds`.
pub const MIN_ROUNDS: (u32, u32) = (0, 100_000);
/// `--resume-window`, s.
pub const RESUME_WINDOW_S: (u64, u64) = (0, 86_400);
/// `--holdback-rounds`.
pub const HOLDBACK_ROUNDS: (u32, u32) = (0, 1_000);

fn float(
    flag: &'static str,
    v: f64,
    (lo, hi): (f64, f64),
    range: &'static str,
) -> Result<(), InvalidOption> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(InvalidOption {
            flag,
            value: v.to_string(),
            range,
        })
    }
}

fn int<T: PartialOrd + ToString>(
    flag: &'static str,
    v: T,
    (lo, hi): (T, T),
    range: &'static str,
) -> Result<(), InvalidOption> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        Err(InvalidOption {
            flag,
            value: v.to_string(),
            range,
        })
    }
}

impl MigrateOptions {
    /// Checks every knob against its range.
    pub fn validate(&self) -> Result<(), InvalidOption> {
        float(
            "max-downtime",
            self.max_downtime_ms,
            MAX_DOWNTIME_MS,
            "must be a number of milliseconds from 0.1 to 600000",
        )?;
        int(
            "max-rounds",
            self.max_rounds,
            MAX_ROUNDS,
            "must be a whole number of rounds from 1 to 100000",
        )?;
        if let Some(b) = self.bandwidth_mibs {
            float(
                "bandwidth",
                b,
                BANDWIDTH_MIBS,
                "must be a number of MiB/s from 0.01 to 1048576 (leave it out for no cap)",
            )?;
        }
        int(
            "timeout",
            self.timeout_s,
            TIMEOUT_S,
            "must be a whole number of seconds from 1 to 604800",
        )?;
        float(
            "converge-threshold",
            self.converge_threshold,
            CONVERGE_THRESHOLD,
            "must be a ratio from 0.01 to 100 (dirty rate over bandwidth; 0.8 is usual)",
        )?;
        int(
            "min-rounds",
            self.min_rounds,
            MIN_ROUNDS,
            "must be a whole number of rounds from 0 to 100000",
        )?;
        int(
            "resume-window",
            self.resume_window_s,
            RESUME_WINDOW_S,
            "must be a whole number of seconds from 0 to 86400",
        )?;
        int(
            "holdback-rounds",
            self.holdback_rounds,
            HOLDBACK_ROUNDS,
            "must be a whole number of rounds from 0 to 1000",
        )?;
        if let super::Compression::Zstd { level } = self.compress {
            int(
                "compress",
                level,
                (
                    *crate::wire::pages::ZSTD_LEVELS.start(),
                    *crate::wire::pages::ZSTD_LEVELS.end(),
                ),
                "must be off, zstd or zstd:LEVEL with LEVEL from 1 to 19",
            )?;
        }
        Ok(())
    }
}

/// A clap value parser for a float knob: parses, then checks the same range as
/// [`MigrateOptions::validate`].
pub fn parse_f64(
    flag: &'static str,
    range: (f64, f64),
    words: &'static str,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number: {words}"))?;
        float(flag, v, range, words)
            .map(|_| v)
            .map_err(|e| e.range.to_string())
    }
}

/// Parses a float knob for the CLI.
pub mod parse {
    use super::*;

    /// `--max-downtime`.
    pub fn max_downtime(s: &str) -> Result<f64, String> {
        parse_f64(
            "max-downtime",
            MAX_DOWNTIME_MS,
            "must be a number of milliseconds from 0.1 to 600000",
        )(s)
    }
    /// `--bandwidth`.
    pub fn bandwidth(s: &str) -> Result<f64, String> {
        parse_f64(
            "bandwidth",
            BANDWIDTH_MIBS,
            "must be a number of MiB/s from 0.01 to 1048576 (leave it out for no cap)",
        )(s)
    }
    /// `--converge-threshold`.
    pub fn converge_threshold(s: &str) -> Result<f64, String> {
        parse_f64(
            "converge-threshold",
            CONVERGE_THRESHOLD,
            "must be a ratio from 0.01 to 100 (dirty rate over bandwidth; 0.8 is usual)",
        )(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        MigrateOptions::default().validate().unwrap();
    }

    #[test]
    fn each_knob_out_of_range_names_its_flag_and_range() {
        type Edit = fn(&mut MigrateOptions);
        let cases: [(Edit, &str); 10] = [
            (|o| o.bandwidth_mibs = Some(0.0), "bandwidth"),
            (|o| o.bandwidth_mibs = Some(-5.0), "bandwidth"),
            (|o| o.bandwidth_mibs = Some(f64::NAN), "bandwidth"),
            (|o| o.converge_threshold = f64::NAN, "converge-threshold"),
            (|o| o.converge_threshold = -1.0, "converge-threshold"),
            (|o| o.max_rounds = 0, "max-rounds"),
            (|o| o.max_downtime_ms = 0.0, "max-downtime"),
            (|o| o.max_downtime_ms = f64::INFINITY, "max-downtime"),
            (|o| o.timeout_s = 0, "timeout"),
            (|o| o.holdback_rounds = 5000, "holdback-rounds"),
        ];
        for (edit, flag) in cases {
            let mut o = MigrateOptions::default();
            edit(&mut o);
            let e = o.validate().unwrap_err();
            assert_eq!(e.flag, flag, "{e}");
            assert!(e.to_string().contains(" from "), "no range in {e}");
        }
    }

    #[test]
    fn the_cli_parsers_refuse_what_validate_refuses() {
        assert!(parse::bandwidth("0").is_err());
        assert!(parse::bandwidth("-5").is_err());
        assert!(parse::bandwidth("abc").unwrap_err().contains("MiB/s"));
        assert_eq!(parse::bandwidth("100"), Ok(100.0));
        assert!(parse::converge_threshold("NaN").is_err());
        assert!(parse::max_downtime("0").is_err());
        assert_eq!(parse::max_downtime("50"), Ok(50.0));
    }
}
