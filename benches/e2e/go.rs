//! The Go side of the bench: builds `benches/e2e/go` (a grpc-go client that dials like
//! kube-apiserver, and the `go-kms` peer server) into `target/e2e/go/`, and drives the client
//! over its stdin/stdout line protocol (documented in `go/client/main.go`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::{Op, Samples};

/// The built Go programs.
pub struct Programs {
    pub client: PathBuf,
    pub peer: PathBuf,
}

/// Whether `go` is on PATH.
pub fn available() -> bool {
    Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `go build`s the client and the peer (Go's build cache makes a rebuild a second or two;
/// modules missing from the module cache come from the module proxy).
pub fn build(out: &Path) -> Programs {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/e2e/go");
    std::fs::create_dir_all(out).expect("create the Go output directory");
    let status = Command::new("go")
        .current_dir(&src)
        .args(["build", "-buildvcs=false", "-trimpath", "-o"])
        .arg(out)
        .args(["./client", "./peer"])
        .env("CGO_ENABLED", "0")
        .status()
        .expect("run go build");
    assert!(
        status.success(),
        "go build in {} failed (output above; it needs Go >= 1.26 and fetches missing modules \
         from the Go module proxy); E2E_CLIENT=tonic E2E_PEERS=none runs without Go",
        src.display()
    );
    Programs {
        client: out.join("client"),
        peer: out.join("peer"),
    }
}

/// One client process with one connection to one server.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Client {
    /// Starts the client on `socket`; returns once its first Status and Encrypt succeeded.
    pub fn start(binary: &Path, socket: &Path) -> Self {
        let mut child = Command::new(binary)
            .arg("-socket")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Go client");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        let ready = client.read();
        assert!(ready["ready"] == true, "Go client: unexpected {ready}");
        client
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read the Go client");
        assert!(n > 0, "the Go client exited (its message is above)");
        serde_json::from_str(&line).expect("a JSON line from the Go client")
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to the Go client");
        self.stdin.flush().expect("write to the Go client");
    }

    /// `callers` goroutines on the one connection, back to back for `seconds`.
    pub fn measure(&mut self, op: Op, callers: usize, seconds: f64) -> Samples {
        let op = match op {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
        };
        self.send(&format!("measure {op} {callers} {seconds}"));
        let v = self.read();
        let latencies = v["latencies_ns"]
            .as_array()
            .expect("latencies_ns")
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        let elapsed = Duration::from_nanos(v["elapsed_ns"].as_u64().expect("elapsed_ns"));
        Samples {
            latencies,
            elapsed,
            per_instance: Vec::new(),
        }
    }

    /// The long run (see `go/client/main.go`): `progress` gets the number of calls made
    /// after each chunk of `every`.
    pub fn long(
        &mut self,
        calls: u64,
        connections: usize,
        every: u64,
        callers: usize,
        mut progress: impl FnMut(u64),
    ) {
        self.send(&format!("long {calls} {connections} {every} {callers}"));
        loop {
            let done = self.read()["calls"].as_u64().expect("calls");
            progress(done);
            if done >= calls {
                return;
            }
        }
    }
}
