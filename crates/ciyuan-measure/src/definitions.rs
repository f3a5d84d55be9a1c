//! Token definitions: versioned, effective-dated CEL rules per service.

use cel::{Context, Program, Value as Cel};
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{Direction, Modality, TokenMap};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Longest expression accepted, in bytes: definitions are short formulas.
const MAX_EXPRESSION_BYTES: usize = 1024;

/// A definition as declared (in the configuration or the API) and recorded in the
/// ledger (`definition.set`).
pub type RawDefinition = ciyuan_core::TokenDefinition;

/// A compiled definition.
pub struct Definition {
    /// The service.
    pub service: String,
    /// Its version.
    pub version: u32,
    /// From when it applies.
    pub effective_from: Timestamp,
    rules: Vec<(Modality, Direction, String, Program)>,
}

impl std::fmt::Debug for Definition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definition")
            .field("service", &self.service)
            .field("version", &self.version)
            .field("effective_from", &self.effective_from)
            .field(
                "rules",
                &self
                    .rules
                    .iter()
                    .map(|(m, d, e, _)| format!("{m}.{d} = {e}"))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// A definition that cannot be used.
    #[error("token definition {service}@{version}: {why}")]
    Invalid {
        /// Service.
        service: String,
        /// Version.
        version: u32,
        /// What is wrong.
        why: String,
    },
}

/// Why an event could not be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasureError {
    /// No definition for the service.
    #[error("unknown service {0:?}: no token definition turns its measures into tokens")]
    UnknownService(String),
    /// The service's first definition starts after the event.
    #[error("no definition of {service} was in force at {at} (the first starts {first})")]
    NotYetDefined {
        /// Service.
        service: String,
        /// Event time.
        at: Timestamp,
        /// Start of the first definition.
        first: Timestamp,
    },
    /// A measure of the wrong shape.
    #[error("data.{0}: {1}")]
    BadMeasure(String, String),
    /// Evaluation failed (a measure it needs is missing, a division by zero, ...).
    #[error("{definition}: {key} = {expression}: {why}")]
    Evaluation {
        /// `service@version`.
        definition: String,
        /// The token key.
        key: String,
        /// The expression.
        expression: String,
        /// What went wrong.
        why: String,
    },
}

/// The tokens of one event and the definition that produced them.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Tokens by modality and direction.
    pub tokens: TokenMap,
    /// `service@version`.
    pub definition: String,
}

/// All definitions, by service, each list ordered by `effective_from`.
#[derive(Debug, Default, Clone)]
pub struct DefinitionSet {
    by_service: HashMap<String, Arc<Vec<Definition>>>,
}

fn invalid(raw: &RawDefinition, why: impl Into<String>) -> DefinitionError {
    DefinitionError::Invalid {
        service: raw.service.clone(),
        version: raw.version,
        why: why.into(),
    }
}

impl DefinitionSet {
    /// Compiles and checks definitions: every expression parses, token keys are
    /// `modality.direction`, and per service versions are unique and increase with
    /// their effective times.
    pub fn new(raw: Vec<RawDefinition>) -> Result<DefinitionSet, DefinitionError> {
        let mut by_service: HashMap<String, Vec<Definition>> = HashMap::new();
        for r in raw {
            if r.service.is_empty() || r.service.len() > 256 {
                return Err(invalid(&r, "service must be 1 to 256 bytes"));
            }
            if r.service == "llm.usage" {
                return Err(invalid(
                    &r,
                    "llm.usage is built in: its events carry token counts",
                ));
            }
            if r.tokens.is_empty() {
                return Err(invalid(
                    &r,
                    "tokens must name at least one modality.direction",
                ));
            }
            let mut rules = Vec::with_capacity(r.tokens.len());
            for (key, expr) in &r.tokens {
                let (m, d) = key
                    .split_once('.')
                    .and_then(|(m, d)| Some((m.parse().ok()?, d.parse().ok()?)))
                    .ok_or_else(|| {
                        invalid(
                            &r,
                            format!("{key:?} is not a modality.direction key such as other.input"),
                        )
                    })?;
                if expr.len() > MAX_EXPRESSION_BYTES {
                    return Err(invalid(
                        &r,
                        format!(
                            "the expression of {key} is longer than {MAX_EXPRESSION_BYTES} bytes"
                        ),
                    ));
                }
                let program = Program::compile(expr)
                    .map_err(|e| invalid(&r, format!("{key} = {expr}: {e}")))?;
                rules.push((m, d, expr.clone(), program));
            }
            by_service
                .entry(r.service.clone())
                .or_default()
                .push(Definition {
                    service: r.service.clone(),
                    version: r.version,
                    effective_from: r.effective_from,
                    rules,
                });
        }
        let mut out = HashMap::new();
        for (service, mut defs) in by_service {
            defs.sort_by_key(|d| (d.effective_from, d.version));
            for pair in defs.windows(2) {
                if pair[1].version <= pair[0].version
                    || pair[1].effective_from == pair[0].effective_from
                {
                    return Err(DefinitionError::Invalid {
                        service: service.clone(),
                        version: pair[1].version,
                        why: format!(
                            "versions must increase with effective_from (version {} from {} and version {} from {})",
                            pair[0].version,
                            pair[0].effective_from,
                            pair[1].version,
                            pair[1].effective_from
                        ),
                    });
                }
            }
            out.insert(service, Arc::new(defs));
        }
        Ok(DefinitionSet { by_service: out })
    }

    /// Whether a service has a definition.
    pub fn knows(&self, service: &str) -> bool {
        self.by_service.contains_key(service)
    }

    /// The definition of `service` in force at `at`.
    pub fn in_force(&self, service: &str, at: Timestamp) -> Result<&Definition, MeasureError> {
        let defs = self
            .by_service
            .get(service)
            .ok_or_else(|| MeasureError::UnknownService(service.to_string()))?;
        let i = defs.partition_point(|d| d.effective_from <= at);
        match i {
            0 => Err(MeasureError::NotYetDefined {
                service: service.to_string(),
                at,
                first: defs[0].effective_from,
            }),
            i => Ok(&defs[i - 1]),
        }
    }

    /// Measures one event's data with the definition in force at its time.
    pub fn measure(
        &self,
        service: &str,
        at: Timestamp,
        data: &Map<String, Value>,
    ) -> Result<Measured, MeasureError> {
        let def = self.in_force(service, at)?;
        let mut ctx = Context::default();
        for (name, v) in data {
            let value = match v {
                Value::Bool(b) => Cel::Bool(*b),
                Value::String(s) => Cel::String(Arc::new(s.clone())),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => Cel::Int(i),
                    (None, Some(u), _) => Cel::UInt(u),
                    (_, _, Some(f)) => Cel::Float(f),
                    _ => {
                        return Err(MeasureError::BadMeasure(
                            name.clone(),
                            "not a number CEL can hold".into(),
                        ));
                    }
                },
                Value::Null | Value::Array(_) | Value::Object(_) => {
                    return Err(MeasureError::BadMeasure(
                        name.clone(),
                        "measures are numbers, strings or booleans".into(),
                    ));
                }
            };
            if !is_identifier(name) {
                return Err(MeasureError::BadMeasure(
                    name.clone(),
                    "not a valid measure name (letters, digits, _)".into(),
                ));
            }
            ctx.add_variable_from_value(name.as_str(), value);
        }
        let label = format!("{}@{}", def.service, def.version);
        let mut tokens = TokenMap::new();
        for (m, d, expr, program) in &def.rules {
            let fail = |why: String| MeasureError::Evaluation {
                definition: label.clone(),
                key: format!("{m}.{d}"),
                expression: expr.clone(),
                why,
            };
            let n: i64 = match program.execute(&ctx).map_err(|e| {
                blame(data, &label, &format!("{m}.{d}"), expr, &e)
                    .unwrap_or_else(|| fail(e.to_string()))
            })? {
                Cel::Int(i) => i,
                Cel::UInt(u) => {
                    i64::try_from(u).map_err(|_| fail(format!("{u} tokens is too large")))?
                }
                Cel::Float(f) => {
                    return Err(fail(format!(
                        "gave the fraction {f}; tokens are whole: round explicitly, e.g. int(math.ceil(...))"
                    )));
                }
                other => return Err(fail(format!("gave {other:?}, not a number of tokens"))),
            };
            if n < 0 {
                return Err(fail(format!("gave {n}: tokens are never negative")));
            }
            tokens
                .add(*m, *d, n)
                .ok_or_else(|| fail("the token total overflows".into()))?;
        }
        Ok(Measured {
            tokens,
            definition: label,
        })
    }
}

/// The field of the event's data a failed evaluation is due to, when one can be
/// named: a measure the expression needs that the event lacks, or one it uses whose
/// value is not a number. The client then reads `data.pages: ...` rather than CEL's
/// words about an operator.
fn blame(
    data: &Map<String, Value>,
    label: &str,
    key: &str,
    expr: &str,
    e: &cel::ExecutionError,
) -> Option<MeasureError> {
    let uses = |name: &str| {
        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w == name)
    };
    if let cel::ExecutionError::UndeclaredReference(name) = e {
        return Some(MeasureError::BadMeasure(
            name.to_string(),
            format!("required: {label} computes {key} = {expr}"),
        ));
    }
    data.iter()
        .find(|(name, v)| !v.is_number() && uses(name))
        .map(|(name, v)| {
            let kind = match v {
                Value::String(_) => "a string",
                Value::Bool(_) => "a boolean",
                _ => "not a number",
            };
            MeasureError::BadMeasure(
                name.clone(),
                format!("is {kind}, where {label} computes {key} = {expr} from it: {e}"),
            )
        })
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(service: &str, version: u32, from: &str, tokens: Value) -> RawDefinition {
        serde_json::from_value(json!({"service": service, "version": version, "effective_from": from, "tokens": tokens})).unwrap()
    }

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn failed_evaluations_name_the_field_of_the_event() {
        let set = DefinitionSet::new(vec![def(
            "doc.verify",
            1,
            "2026-01-01T00:00:00Z",
            json!({"other.input": "5 + 2 * pages"}),
        )])
        .unwrap();
        let at: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let e = set
            .measure("doc.verify", at, &data(json!({"pages": "three"})))
            .unwrap_err();
        assert!(
            matches!(&e, MeasureError::BadMeasure(f, _) if f == "pages"),
            "{e}"
        );
        assert!(e.to_string().starts_with("data.pages: is a string"), "{e}");
        let e = set
            .measure("doc.verify", at, &data(json!({"page": 3})))
            .unwrap_err();
        assert!(e.to_string().starts_with("data.pages: required"), "{e}");
    }

    #[test]
    fn versions_apply_from_their_time_and_never_rewrite_the_past() {
        let set = DefinitionSet::new(vec![
            def(
                "doc.verify",
                2,
                "2026-07-01T00:00:00Z",
                json!({"other.input": "5 + 2 * pages"}),
            ),
            def(
                "doc.verify",
                1,
                "2026-01-01T00:00:00Z",
                json!({"other.input": "3 * pages"}),
            ),
            def(
                "face.match",
                1,
                "2026-01-01T00:00:00Z",
                json!({"other.input": "1"}),
            ),
        ])
        .unwrap();
        let d = data(json!({"pages": 4}));
        let before = set
            .measure("doc.verify", "2026-06-30T23:59:59Z".parse().unwrap(), &d)
            .unwrap();
        assert_eq!(
            (before.tokens.total(), before.definition.as_str()),
            (Some(12), "doc.verify@1")
        );
        let after = set
            .measure("doc.verify", "2026-07-01T00:00:00Z".parse().unwrap(), &d)
            .unwrap();
        assert_eq!(
            (after.tokens.total(), after.definition.as_str()),
            (Some(13), "doc.verify@2")
        );
        let face = set
            .measure(
                "face.match",
                "2026-07-01T00:00:00Z".parse().unwrap(),
                &data(json!({})),
            )
            .unwrap();
        assert_eq!(face.tokens.total(), Some(1));
        assert_eq!(
            set.measure("doc.verify", "2025-12-31T00:00:00Z".parse().unwrap(), &d)
                .unwrap_err()
                .to_string(),
            "no definition of doc.verify was in force at 2025-12-31T00:00:00Z (the first starts 2026-01-01T00:00:00Z)"
        );
        assert!(matches!(
            set.measure("nope", Timestamp::UNIX_EPOCH, &d),
            Err(MeasureError::UnknownService(_))
        ));
    }

    #[test]
    fn expressions_are_checked_and_results_must_be_whole_non_negative_tokens() {
        let set = DefinitionSet::new(vec![def(
            "audio.transcribe",
            1,
            "2026-01-01T00:00:00Z",
            json!({"audio.input": "seconds > 60 ? (seconds + 14) / 15 : 4", "other.output": "words - 10"}),
        )])
        .unwrap();
        let at: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        let m = set
            .measure(
                "audio.transcribe",
                at,
                &data(json!({"seconds": 61, "words": 12})),
            )
            .unwrap();
        assert_eq!(m.tokens.iter().map(|t| t.count).collect::<Vec<_>>(), [5, 2]);
        let err = set
            .measure(
                "audio.transcribe",
                at,
                &data(json!({"seconds": 61, "words": 3})),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("gave -7: tokens are never negative"),
            "{err}"
        );
        let err = set
            .measure("audio.transcribe", at, &data(json!({"seconds": 61})))
            .unwrap_err();
        assert!(
            err.to_string().contains("other.output = words - 10"),
            "{err}"
        );
        let err = set
            .measure(
                "audio.transcribe",
                at,
                &data(json!({"seconds": 61.5, "words": 20})),
            )
            .unwrap_err();
        // CEL is strictly typed: a fractional measure in integer arithmetic is an error
        // that names the definition, the key and the expression.
        assert!(
            err.to_string()
                .starts_with("audio.transcribe@1: audio.input = "),
            "{err}"
        );
        let img = DefinitionSet::new(vec![def(
            "img",
            1,
            "2026-01-01T00:00:00Z",
            json!({"image.input": "double(pixels) / 750.0"}),
        )])
        .unwrap();
        let err = img
            .measure("img", at, &data(json!({"pixels": 1000})))
            .unwrap_err();
        assert!(err.to_string().contains("gave the fraction"), "{err}");
        let err = set
            .measure("audio.transcribe", at, &data(json!({"seconds": [1]})))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "data.seconds: measures are numbers, strings or booleans"
        );
    }

    #[test]
    fn bad_definitions_are_refused() {
        let at = "2026-01-01T00:00:00Z";
        for (raw, why) in [
            (
                vec![def("x", 1, at, json!({"text.sideways": "1"}))],
                "is not a modality.direction key",
            ),
            (
                vec![def("x", 1, at, json!({"other.input": "1 +"}))],
                "other.input = 1 +",
            ),
            (vec![def("x", 1, at, json!({}))], "at least one"),
            (
                vec![def("llm.usage", 1, at, json!({"other.input": "1"}))],
                "built in",
            ),
            (
                vec![
                    def("x", 2, at, json!({"other.input": "1"})),
                    def("x", 1, "2026-02-01T00:00:00Z", json!({"other.input": "2"})),
                ],
                "versions must increase",
            ),
        ] {
            let err = DefinitionSet::new(raw).unwrap_err().to_string();
            assert!(err.contains(why), "{err} lacks {why}");
        }
    }
}
