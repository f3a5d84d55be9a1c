//! Finance entries: the close of a statement's period, and a reconciliation's result.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A statement issued for a period (entry kind `statement.closed`, on the statement's
/// node): the period is closed for that node, and `document` is the statement exactly
/// as issued, so it is read back byte for byte and its hash proves it. Usage or
/// corrections that reach a closed period later are billed in the next open one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementClosed {
    /// The period's name, a calendar month: `2026-11`.
    pub period: String,
    /// Its first instant (UTC).
    pub from: Timestamp,
    /// Its end (UTC, exclusive).
    pub to: Timestamp,
    /// The time zone it was computed in.
    pub time_zone: String,
    /// SHA-256 of `document`, in hexadecimal.
    pub sha256: String,
    /// The statement's JSON as issued.
    pub document: String,
}

impl StatementClosed {
    /// Closes `period` with `document`, hashing it.
    pub fn new(
        period: String,
        from: Timestamp,
        to: Timestamp,
        time_zone: String,
        document: String,
    ) -> StatementClosed {
        let sha256 = hex_sha256(document.as_bytes());
        StatementClosed {
            period,
            from,
            to,
            time_zone,
            sha256,
            document,
        }
    }

    /// Whether `sha256` is the document's hash and the period is not empty.
    pub fn check(&self) -> Result<(), String> {
        if self.from >= self.to {
            return Err(format!(
                "from: {} is not before to ({})",
                self.from, self.to
            ));
        }
        let h = hex_sha256(self.document.as_bytes());
        if h != self.sha256 {
            return Err(format!(
                "sha256: the document hashes to {h}, the entry says {}",
                self.sha256
            ));
        }
        Ok(())
    }
}

/// A provider's usage export compared with what the gateway recorded for one upstream
/// (entry kind `reconciliation`, on the root): the file's hash, the days it covers, and
/// the findings as the comparison wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconciled {
    /// The upstream (provider name in the gateway's configuration).
    pub upstream: String,
    /// The export's format: `openai`, `anthropic` or `csv`.
    pub format: String,
    /// SHA-256 of the file, in hexadecimal.
    pub sha256: String,
    /// First day covered (UTC), `YYYY-MM-DD`.
    pub from: String,
    /// Last day covered (UTC), inclusive.
    pub to: String,
    /// (day, model, key) rows compared.
    pub compared: u64,
    /// Of them, those whose difference is beyond the tolerance.
    pub beyond_tolerance: u64,
    /// The comparison: tolerance, totals and every finding.
    pub result: serde_json::Value,
}

impl Reconciled {
    /// SHA-256 of `bytes`, in hexadecimal (the file's, for [`Reconciled::sha256`]).
    pub fn hash(bytes: &[u8]) -> String {
        hex_sha256(bytes)
    }
}

/// A scheduled report delivered (entry kind `report.delivered`, on the report's node):
/// which period, what bytes (their hash and length) and where they went. The schedule's
/// progress is the latest period delivered by the schedule (`manual: false`), so a
/// restarted server knows where to resume from the projections alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportDelivered {
    /// The report's name in the configuration.
    pub name: String,
    /// The period's label: `2026-11-05` (a day in `time_zone`) or `2026-11-05T10`
    /// (a UTC hour).
    pub period: String,
    /// The period's first instant (UTC).
    pub period_start: Timestamp,
    /// Its end (UTC, exclusive).
    pub period_end: Timestamp,
    /// The time zone its days are computed in.
    pub time_zone: String,
    /// `csv` or `json`.
    pub format: String,
    /// SHA-256 of the bytes delivered, in hexadecimal.
    pub sha256: String,
    /// How many bytes.
    pub bytes: u64,
    /// Where they went: the file written, or the webhook URL without credentials
    /// (no user, password or query).
    pub destination: String,
    /// For a webhook: the first 16 hexadecimal digits of SHA-256 of the signing
    /// secret, so a rotation shows without the secret ever being recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Delivered by hand (`ciyuan reports run`), outside the schedule.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
}

impl ReportDelivered {
    /// SHA-256 of `bytes`, in hexadecimal (for [`ReportDelivered::sha256`]).
    pub fn hash(bytes: &[u8]) -> String {
        hex_sha256(bytes)
    }

    /// Whether the period is not empty, the hash is 64 hexadecimal digits and the name
    /// and period are present.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.period.is_empty() {
            return Err("name, period: a delivery names its report and period".into());
        }
        if self.period_start >= self.period_end {
            return Err(format!(
                "period_start: {} is not before period_end ({})",
                self.period_start, self.period_end
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "sha256: {:?} is not 64 hexadecimal digits",
                self.sha256
            ));
        }
        Ok(())
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_documents() {
        let mut c = StatementClosed::new(
            "2026-11".into(),
            "2026-10-31T16:00:00Z".parse().unwrap(),
            "2026-11-30T16:00:00Z".parse().unwrap(),
            "Asia/Shanghai".into(),
            "{\"total\":\"1\"}".into(),
        );
        assert!(c.check().is_ok());
        assert_eq!(c.sha256.len(), 64);
        c.document.push(' ');
        assert!(c.check().unwrap_err().starts_with("sha256:"));
    }

    #[test]
    fn a_delivery_names_its_report_a_period_and_a_hash() {
        let mut d = ReportDelivered {
            name: "hourly".into(),
            period: "2026-11-05T10".into(),
            period_start: "2026-11-05T10:00:00Z".parse().unwrap(),
            period_end: "2026-11-05T11:00:00Z".parse().unwrap(),
            time_zone: "UTC".into(),
            format: "json".into(),
            sha256: ReportDelivered::hash(b"{}"),
            bytes: 2,
            destination: "https://hooks.example.com/in".into(),
            secret_sha256: None,
            manual: false,
        };
        assert!(d.check().is_ok());
        d.sha256.make_ascii_uppercase();
        assert!(d.check().is_ok(), "hexadecimal either case");
        d.sha256.pop();
        assert!(d.check().unwrap_err().starts_with("sha256:"));
        d.sha256 = ReportDelivered::hash(b"{}");
        d.period_end = d.period_start;
        assert!(d.check().unwrap_err().starts_with("period_start:"));
        d.period_end = "2026-11-05T11:00:00Z".parse().unwrap();
        d.name.clear();
        assert!(d.check().unwrap_err().starts_with("name"));
    }
}
