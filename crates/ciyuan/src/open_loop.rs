//! The open-loop client of `bench gateway --upstream`: requests sent at their
//! scheduled times from one thread, over a fixed set of keep-alive HTTP/1.1
//! connections, each answer's latency counted from its scheduled time (a request that
//! waits for a free connection waits on the clock, as wrk2 corrects for coordinated
//! omission).
//!
//! Written by hand rather than on an HTTP client library because the client shares
//! the machine with what it measures: the client it replaces (reqwest on the
//! multi-threaded runtime, a sleeping thread spawning each request) cost 60–70 µs of
//! CPU a request, 0.6–0.7 of a core at 10,000 requests/s on two cores, as much as the
//! gateway it measured. Here a request costs one `write`, one `read` and at most one
//! `ppoll` (whose timeout has nanoseconds, where `epoll_wait`'s and tokio's timers
//! have milliseconds), all on one thread. It reads only what the measurement needs:
//! the status line, `Content-Length` and the body's first byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What an open-loop run measured.
#[derive(Debug, Default)]
pub struct Paced {
    /// Each answer's latency from its scheduled time, in microseconds.
    pub lat: Vec<u64>,
    /// How late each request was written after its scheduled time, in microseconds.
    pub late: Vec<u64>,
    /// Seconds from the first scheduled time to the last request written.
    pub sent_secs: f64,
    /// Requests that failed (no answer, a broken connection, not `200` with a JSON
    /// object).
    pub failed: u64,
    /// What the first few failures were.
    pub problems: Vec<String>,
}

/// Where the requests go and what they are.
pub struct Request {
    addr: SocketAddr,
    bytes: Vec<u8>,
}

impl Request {
    /// A `POST` of `body` (JSON) to `url` (`http://host:port/path`), with `headers`.
    pub fn post(url: &str, headers: &[(&str, &str)], body: &str) -> anyhow::Result<Request> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("the open-loop client speaks plain http only: {url}"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{host} has no address"))?;
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        Ok(Request { addr, bytes })
    }
}

/// One keep-alive connection and the request it carries, if any.
struct Conn {
    stream: TcpStream,
    /// The scheduled time of the request in flight.
    due: Option<Instant>,
    /// Bytes of the request still to write.
    unwritten: usize,
    /// The answer read so far.
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            due: None,
            unwritten: 0,
            buf: Vec::with_capacity(4096),
        })
    }
}

/// How an answer in `buf` stands.
#[derive(Debug, PartialEq)]
enum Answer {
    /// Not all there yet.
    Partial,
    /// Whole: whether it was `200` with a body that starts as a JSON object, and its
    /// length in `buf`.
    Whole { ok: bool, len: usize },
    /// Not an answer this client can read (no `Content-Length`, a broken head).
    Unreadable(String),
}

fn answer(buf: &[u8]) -> Answer {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer::Partial;
    };
    let head = &buf[..head_end];
    let Ok(head) = std::str::from_utf8(head) else {
        return Answer::Unreadable("the answer's head is not UTF-8".into());
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Answer::Unreadable(format!("no status line: {:.80}", head));
    };
    let length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let Some(length) = length else {
        return Answer::Unreadable(format!("status {status} without content-length"));
    };
    let len = head_end + 4 + length;
    if buf.len() < len {
        return Answer::Partial;
    }
    let ok = status == 200 && buf.get(head_end + 4) == Some(&b'{');
    Answer::Whole { ok, len }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A run's connections and tallies.
struct Run<'a> {
    request: &'a Request,
    conns: Vec<Conn>,
    /// Connections with no request in flight.
    free: Vec<usize>,
    /// Requests answered or given up.
    done: u64,
    out: Paced,
}

impl Run<'_> {
    fn fail(&mut self, what: String) {
        self.out.failed += 1;
        if self.out.problems.len() < 10 {
            self.out.problems.push(what);
        }
    }

    /// Gives up the request on connection `c` and opens it again.
    fn lost(&mut self, c: usize, what: String) -> std::io::Result<()> {
        self.fail(what);
        self.done += 1;
        self.conns[c] = Conn::open(self.request.addr)?;
        self.free.push(c);
        Ok(())
    }

    /// Writes what is left of the request on connection `c` (as much as the socket
    /// takes); the request is lost if the connection broke.
    fn write(&mut self, c: usize) -> std::io::Result<()> {
        let bytes = &self.request.bytes;
        let conn = &mut self.conns[c];
        match conn.stream.write(&bytes[bytes.len() - conn.unwritten..]) {
            Ok(k) => conn.unwritten -= k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return self.lost(c, format!("writing a request: {e}")),
        }
        Ok(())
    }

    /// Reads what connection `c` has and, once its answer is whole, counts it.
    fn read(&mut self, c: usize, chunk: &mut [u8]) -> std::io::Result<()> {
        let conn = &mut self.conns[c];
        let broken = loop {
            match conn.stream.read(chunk) {
                Ok(0) => break Some("the connection closed".to_string()),
                Ok(k) => conn.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(format!("reading an answer: {e}")),
            }
        };
        let Some(due) = conn.due else {
            return Ok(());
        };
        match (answer(&conn.buf), broken) {
            (Answer::Whole { ok, len }, broken) => {
                self.out.lat.push(micros(due.elapsed()));
                self.done += 1;
                let extra = conn.buf.len() > len;
                if !ok {
                    let shown = String::from_utf8_lossy(&conn.buf[..len.min(300)]).into_owned();
                    self.fail(format!("not 200 with a JSON object: {shown}"));
                }
                if extra {
                    self.fail("bytes after an answer".into());
                }
                if extra || broken.is_some() {
                    self.conns[c] = Conn::open(self.request.addr)?;
                } else {
                    self.conns[c].due = None;
                }
                self.free.push(c);
                Ok(())
            }
            (Answer::Partial, None) => Ok(()),
            (Answer::Partial, Some(why)) | (Answer::Unreadable(why), _) => self.lost(c, why),
        }
    }
}

/// Sends `request` at `rate` a second for `seconds` over `connections` connections
/// and waits for every answer (at most `grace` after the last is sent).
pub fn run(
    request: &Request,
    rate: f64,
    seconds: f64,
    connections: usize,
    grace: Duration,
) -> anyhow::Result<Paced> {
    anyhow::ensure!(
        rate > 0.0 && connections > 0,
        "rate and connections must be positive"
    );
    let n = (rate * seconds).round().max(1.0) as u64;
    let mut run = Run {
        request,
        conns: (0..connections)
            .map(|_| Conn::open(request.addr))
            .collect::<std::io::Result<Vec<_>>>()?,
        free: (0..connections).rev().collect(),
        done: 0,
        out: Paced {
            lat: Vec::with_capacity(n as usize),
            late: Vec::with_capacity(n as usize),
            ..Paced::default()
        },
    };
    let mut waiting: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let start = Instant::now() + Duration::from_millis(10);
    let due_of = |i: u64| start + Duration::from_secs_f64(i as f64 / rate);
    let mut next = 0u64;
    let mut last_sent = start;
    let mut chunk = vec![0u8; 16 * 1024];
    let mut busy: Vec<usize> = Vec::with_capacity(connections);
    let mut ready: Vec<(usize, rustix::event::PollFlags)> = Vec::with_capacity(connections);
    while run.done < n {
        let now = Instant::now();
        while next < n && due_of(next) <= now {
            waiting.push_back(due_of(next));
            next += 1;
        }
        if next == n && now > last_sent + grace {
            let missing = n - run.done;
            run.fail(format!(
                "{missing} requests unanswered {grace:?} after the last was sent"
            ));
            run.out.failed += missing - 1;
            break;
        }
        // Write what is due on free connections.
        while let (Some(&due), Some(&c)) = (waiting.front(), run.free.last()) {
            waiting.pop_front();
            run.free.pop();
            let written = Instant::now();
            run.out
                .late
                .push(micros(written.saturating_duration_since(due)));
            last_sent = written;
            let conn = &mut run.conns[c];
            conn.due = Some(due);
            conn.unwritten = request.bytes.len();
            conn.buf.clear();
            run.write(c)?;
        }
        // Wait for answers, or until the next request is due.
        let timeout = if next < n {
            due_of(next).saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(100)
        };
        busy.clear();
        busy.extend((0..run.conns.len()).filter(|&c| run.conns[c].due.is_some()));
        if busy.is_empty() {
            if !timeout.is_zero() {
                std::thread::sleep(timeout);
            }
            continue;
        }
        let mut fds: Vec<rustix::event::PollFd<'_>> = busy
            .iter()
            .map(|&c| {
                let mut flags = rustix::event::PollFlags::IN;
                if run.conns[c].unwritten > 0 {
                    flags |= rustix::event::PollFlags::OUT;
                }
                rustix::event::PollFd::new(&run.conns[c].stream, flags)
            })
            .collect();
        let ts = rustix::event::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        ready.clear();
        ready.extend(
            busy.iter()
                .zip(&fds)
                .map(|(&c, fd)| (c, fd.revents()))
                .filter(|(_, r)| !r.is_empty()),
        );
        drop(fds);
        for &(c, revents) in &ready {
            if run.conns[c].unwritten > 0 && revents.contains(rustix::event::PollFlags::OUT) {
                run.write(c)?;
                if run.conns[c].due.is_none() {
                    // Lost while writing.
                    continue;
                }
            }
            run.read(c, &mut chunk)?;
        }
    }
    run.out.sent_secs = last_sent.saturating_duration_since(start).as_secs_f64();
    Ok(run.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_whole_only_with_their_whole_body() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx: y\r\n\r\n{}";
        assert_eq!(
            answer(a),
            Answer::Whole {
                ok: true,
                len: a.len()
            }
        );
        assert_eq!(answer(&a[..a.len() - 1]), Answer::Partial);
        assert_eq!(answer(&a[..20]), Answer::Partial);
        let e = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            answer(e),
            Answer::Whole {
                ok: false,
                len: e.len()
            }
        );
        let not_json = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(
            answer(not_json),
            Answer::Whole {
                ok: false,
                len: not_json.len()
            }
        );
        assert!(matches!(
            answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
            Answer::Unreadable(_)
        ));
        assert!(matches!(answer(b"garbage\r\n\r\n"), Answer::Unreadable(_)));
    }

    #[test]
    fn a_paced_run_sends_every_request_and_reads_every_answer() {
        // A server that answers every request on each connection with one fixed
        // answer, and one that closes the connection after the first answer.
        for closing in [false, true] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut s) = stream else { return };
                    std::thread::spawn(move || {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            let Ok(k) = s.read(&mut chunk) else { return };
                            if k == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..k]);
                            // Each request here is its head and a body of 2 bytes.
                            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                if buf.len() < end + 6 {
                                    break;
                                }
                                buf.drain(..end + 6);
                                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                                    .is_err()
                                {
                                    return;
                                }
                                if closing {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            let req = Request::post(
                &format!("http://{addr}/v1/x"),
                &[("authorization", "Bearer k")],
                "{}",
            )
            .unwrap();
            assert!(String::from_utf8_lossy(&req.bytes).starts_with("POST /v1/x HTTP/1.1\r\n"));
            let paced = run(&req, 2000.0, 0.25, 4, Duration::from_secs(5)).unwrap();
            // Closing after each answer: the client reads the answer, then finds the
            // connection closed on its next request at the latest.
            if closing {
                assert_eq!(
                    paced.lat.len() as u64 + paced.failed,
                    500,
                    "{:?}",
                    paced.problems
                );
            } else {
                assert_eq!(paced.failed, 0, "{:?}", paced.problems);
                assert_eq!(paced.lat.len(), 500);
            }
            assert_eq!(paced.late.len(), 500);
            assert!(
                paced.sent_secs > 0.2 && paced.sent_secs < 1.0,
                "{}",
                paced.sent_secs
            );
        }
    }
}
