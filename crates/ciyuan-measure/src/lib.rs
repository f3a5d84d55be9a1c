//! Measuring: turning what an AI service reports into tokens, by declared rules.
//!
//! A [`Definition`] says how one service's raw measures (pages, seconds, matches, ...)
//! become tokens per modality and direction, as CEL expressions — a language that is
//! safe to evaluate (no IO, no loops, always terminates) and that users already know
//! from Kubernetes and Envoy. Definitions are versioned and effective-dated: a change
//! takes effect from its stated time and never rewrites the past, because an event is
//! measured by the definition in force at the event's own time, and every usage record
//! names `service@version`.
//!
//! ```
//! use ciyuan_measure::{DefinitionSet, RawDefinition};
//! let raw: RawDefinition = serde_json::from_value(serde_json::json!({
//!     "service": "doc.verify", "version": 1, "effective_from": "2026-01-01T00:00:00Z",
//!     "tokens": {"other.input": "5 + 2 * pages"}
//! })).unwrap();
//! let set = DefinitionSet::new(vec![raw]).unwrap();
//! let data = serde_json::json!({"pages": 3});
//! let m = set.measure("doc.verify", "2026-06-01T00:00:00Z".parse().unwrap(), data.as_object().unwrap()).unwrap();
//! assert_eq!(m.tokens.total(), Some(11));
//! assert_eq!(m.definition, "doc.verify@1");
//! ```
#![deny(missing_docs)]

pub mod corpus;
mod definitions;
pub mod media;
pub mod text;

pub use definitions::{
    Definition, DefinitionError, DefinitionSet, MeasureError, Measured, RawDefinition,
};
