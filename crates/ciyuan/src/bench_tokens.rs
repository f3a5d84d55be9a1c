//! `ciyuan bench tokens`: our counters against Python tiktoken, same text, same run.

use anyhow::Context;
use ciyuan_measure::text::Encoding;
use std::path::PathBuf;
use std::time::Instant;

/// The parity corpus: English, Chinese, mixed, code and adversarial strings.
const CORPUS: &str = include_str!("../../ciyuan-measure/tests/parity/corpus.json");

/// The peer: Python tiktoken reading the same vocabulary files from the tiktoken-rs
/// crate source (named as tiktoken's cache expects), so it runs offline.
const PEER: &str = r#"
import glob, json, os, shutil, sys, tempfile, time
home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
assets = sorted(glob.glob(home + "/registry/src/*/tiktoken-rs-0.12.*/assets"))[-1]
cache = tempfile.mkdtemp()
for name, cached in {"o200k_base.tiktoken": "fb374d419588a4632f3f557e76b4b70aebbca790",
                     "cl100k_base.tiktoken": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"}.items():
    shutil.copy(assets + "/" + name, cache + "/" + cached)
os.environ["TIKTOKEN_CACHE_DIR"] = cache
import tiktoken
text = open(sys.argv[1], encoding="utf-8", newline="").read()  # keep \r as is
out = {}
for name in ["o200k_base", "cl100k_base"]:
    enc = tiktoken.get_encoding(name)
    enc.encode_ordinary("warm up")
    t = time.perf_counter(); n = len(enc.encode_ordinary(text)); dt = time.perf_counter() - t
    out[name] = {"tokens": n, "seconds": dt}
out["version"] = tiktoken.__version__
print(json.dumps(out))
"#;

pub fn run(file: Option<PathBuf>, bytes: usize, python: &str, json: bool) -> anyhow::Result<()> {
    let base = match &file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => serde_json::from_str::<Vec<String>>(CORPUS)?.join("\n"),
    };
    let mut text = String::with_capacity(bytes + base.len());
    while text.len() < bytes.max(1) {
        text.push_str(&base);
        text.push('\n');
    }
    let mb = text.len() as f64 / 1e6;
    println!("counting {:.1} MB", mb);
    let mut figures = serde_json::Map::new();
    let mut ours = std::collections::BTreeMap::new();
    let mut one = std::collections::BTreeMap::new();
    for enc in Encoding::ALL {
        enc.count("warm up")?; // loads the vocabulary outside the timing
        let t = Instant::now();
        let n = enc.count(&text)?;
        let secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let n1 = enc.count_on_one_thread(&text)?;
        let secs1 = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            n1 == n,
            "{}: {n} tokens counted in parts, {n1} on one thread",
            enc.name()
        );
        println!(
            "  ciyuan {:<12} {:>10} tokens {:>7.1} MB/s on every core, {:>7.1} MB/s on one thread",
            enc.name(),
            n,
            mb / secs,
            mb / secs1
        );
        ours.insert(enc.name(), (n, secs));
        one.insert(enc.name(), secs1);
        figures.insert(
            format!("{}_mb_per_sec", enc.name()),
            serde_json::json!(mb / secs),
        );
        figures.insert(
            format!("{}_mb_per_sec_one_thread", enc.name()),
            serde_json::json!(mb / secs1),
        );
    }
    let dir = std::env::temp_dir().join(format!("ciyuan-bench-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("text.txt");
    std::fs::write(&path, &text)?;
    let peer = std::process::Command::new(python)
        .args(["-c", PEER])
        .arg(&path)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    match peer {
        Ok(o) if o.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("peer output")?;
            for name in ["o200k_base", "cl100k_base"] {
                let (n, secs) = ours[name];
                let pn = v[name]["tokens"].as_u64().unwrap_or(0) as usize;
                let psecs = v[name]["seconds"].as_f64().unwrap_or(f64::NAN);
                let same = if pn == n {
                    "identical counts"
                } else {
                    "COUNTS DIFFER"
                };
                println!(
                    "  python tiktoken {} {:<12} {:>10} tokens {:>7.1} MB/s -> ciyuan is {:.2}x on every core, {:.2}x on one thread ({same})",
                    v["version"].as_str().unwrap_or("?"),
                    name,
                    pn,
                    mb / psecs,
                    psecs / secs,
                    psecs / one[name]
                );
                figures.insert(
                    format!("{name}_speedup_vs_tiktoken"),
                    serde_json::json!(psecs / secs),
                );
                figures.insert(
                    format!("{name}_speedup_vs_tiktoken_one_thread"),
                    serde_json::json!(psecs / one[name]),
                );
                figures.insert(
                    format!("{name}_counts_identical"),
                    serde_json::json!(pn == n),
                );
            }
        }
        Ok(o) => println!(
            "  peer unavailable ({python} with tiktoken failed: {}); install it with `pip install tiktoken==0.14.0`",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => println!("  peer unavailable ({python}: {e})"),
    }
    if json {
        figures.insert("megabytes".into(), serde_json::json!(mb));
        println!("{}", serde_json::Value::Object(figures));
    }
    Ok(())
}
