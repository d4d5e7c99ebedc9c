//! Interoperability with independent gRPC clients, dialing the way real apiservers do:
//!
//! - grpc-go (Debian's packaged version) with `WithAuthority("localhost")`: kube-apiserver 1.32+.
//! - grpc-go without an authority override, so `:authority` is the socket path:
//!   kube-apiserver 1.27–1.31.
//! - Python grpcio with default options: a percent-encoded path as `:authority`.
//!
//! Each client applies the apiserver's response validation (KMSV2.md §2) itself. Missing
//! toolchains fail the test with the package to install; they are never skipped.
#![allow(unsafe_code)] // tests drive processes and limits through libc (kill, pipe, rlimit, getuid)
#![allow(missing_docs)] // test harness items are shared between modules, not a documented API

mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kms_plugin::h2authority::REWROTE_LOG;
use support::Plugin;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Debian keeps its Go library packages here (GOPATH layout).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";
/// Status+Encrypt+Decrypt rounds per client run, all on one connection.
const ROUNDS: &str = "5";

/// A plugin on a fresh abstract socket; abstract sockets need `allowed_uids`.
async fn on_abstract_socket(dir: &Path) -> Plugin {
    let socket = format!("@kms-plugin-interop-{}", rand::random::<u64>());
    let allowed = format!("allowed_uids = [{}]", support::my_uid());
    let config = support::file_root_config(dir, &socket, &allowed);
    Plugin::start(&socket, &["--config", &config], &[], dir).await
}

fn has_command(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Checks that the Go toolchain, protoc, its Go plugins and Debian's Go libraries exist.
fn go_prerequisites() -> Result<(), String> {
    let commands = [
        ("go", "golang-go"),
        ("protoc", "protobuf-compiler"),
        ("protoc-gen-go", "protoc-gen-go"),
        ("protoc-gen-go-grpc", "protoc-gen-go-grpc"),
    ];
    let libraries = [
        ("google.golang.org/grpc", "golang-google-grpc-dev"),
        ("google.golang.org/protobuf", "golang-google-protobuf-dev"),
        (
            "github.com/golang/protobuf",
            "golang-github-golang-protobuf-1-5-dev",
        ),
    ];
    let mut missing: Vec<&str> = commands
        .iter()
        .filter(|(cmd, _)| !has_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.extend(
        libraries
            .iter()
            .filter(|(lib, _)| !Path::new(DEBIAN_GOPATH).join("src").join(lib).is_dir())
            .map(|(_, pkg)| *pkg),
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the grpc-go interop client needs Debian packages: apt-get install {}",
            missing.join(" ")
        ))
    }
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Generates the Go stubs from proto/kms_v2.proto and builds tests/go/kms_client.go,
/// offline, in GOPATH mode against Debian's packaged grpc-go.
fn build_go_client() -> Result<PathBuf, String> {
    go_prerequisites()?;
    let tmp = env!("CARGO_TARGET_TMPDIR");
    // Kept for the life of the test binary; it lives under the target dir.
    let dir = tempfile::Builder::new()
        .prefix("interop-go-")
        .tempdir_in(tmp)
        .map_err(|e| format!("tempdir: {e}"))?
        .keep();
    // The import path of the stubs comes from `option go_package` in the proto.
    let stubs = dir.join("src/kms-plugin/tests/go/kmsv2");
    std::fs::create_dir_all(&stubs).map_err(|e| format!("mkdir {}: {e}", stubs.display()))?;
    let out = format!("paths=source_relative:{}", stubs.display());
    run_tool(
        Command::new("protoc")
            .arg(format!("-I{REPO}/proto"))
            .arg(format!("--go_out={out}"))
            .arg(format!("--go-grpc_out={out}"))
            .arg(format!("{REPO}/proto/kms_v2.proto")),
        "protoc --go_out --go-grpc_out",
    )?;
    let bin = dir.join("kms_client");
    run_tool(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(format!("{REPO}/tests/go/kms_client.go"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0")
            .env("GOPATH", format!("{}:{DEBIAN_GOPATH}", dir.display()))
            // Shared across runs so only the first build compiles grpc-go.
            .env("GOCACHE", format!("{tmp}/go-build-cache")),
        "go build tests/go/kms_client.go",
    )?;
    Ok(bin)
}

fn go_client() -> &'static Path {
    static CLIENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match CLIENT.get_or_init(build_go_client) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn python_prerequisites() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .map_err(|e| format!("python3 not found ({e}): apt-get install python3"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the Python interop client needs grpcio: python3 -m pip install grpcio grpcio-tools\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a client to completion and fails the test with its output unless it succeeded.
fn expect_success(cmd: &mut Command, what: &str, plugin: &Plugin) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}{stderr}\n--- plugin log ---\n{}",
        out.status,
        plugin.output()
    );
    assert!(stdout.contains("rounds ok"), "{what}: {stdout}{stderr}");
}

fn run_go(plugin: &Plugin, authority: &str) {
    run_go_expecting(plugin, authority, "");
}

/// `version` "" accepts what 1.29+ accept; "v2beta1" is what 1.27 and 1.28 require.
fn run_go_expecting(plugin: &Plugin, authority: &str, version: &str) {
    let bin = go_client();
    expect_success(
        Command::new(bin).args([
            "-socket",
            &plugin.socket,
            "-authority",
            authority,
            "-version",
            version,
            "-n",
            ROUNDS,
        ]),
        &format!(
            "grpc-go client (authority {authority:?}) on {}",
            plugin.socket
        ),
        plugin,
    );
}

fn run_python(plugin: &Plugin) {
    if let Err(e) = python_prerequisites() {
        panic!("{e}");
    }
    expect_success(
        Command::new("python3").args([
            &format!("{REPO}/tests/python/kms_client.py"),
            "--socket",
            &plugin.socket,
            "-n",
            ROUNDS,
        ]),
        &format!("grpcio client on {}", plugin.socket),
        plugin,
    );
}

/// Whether the plugin's (debug) log says the rewriter replaced a client's `:authority`: the
/// client really sent one h2 would reject, and the calls passed because it was rewritten.
fn assert_rewritten(plugin: &Plugin, expected: bool) {
    // The log is written by a worker thread: give an expected line a moment to land.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while expected && !plugin.output().contains(REWROTE_LOG) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = plugin.output();
    assert_eq!(
        log.contains(REWROTE_LOG),
        expected,
        "`{REWROTE_LOG}` expected: {expected}; plugin log:\n{log}"
    );
}

/// kube-apiserver 1.32+: `:authority` is `localhost`.
#[tokio::test]
async fn grpc_go_with_localhost_authority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    run_go(&plugin, "localhost");
    assert_rewritten(&plugin, false);
}

/// kube-apiserver 1.27–1.31: no override, so grpc-go sends the socket path as `:authority`.
#[tokio::test]
async fn grpc_go_with_socket_path_as_authority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    run_go(&plugin, "");
    assert_rewritten(&plugin, true);
}

/// kube-apiserver 1.27/1.28: socket path as `:authority` and only `v2beta1` accepted.
#[tokio::test]
async fn grpc_go_as_apiserver_1_27_with_api_version_v2beta1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let key = dir.path().join("keys/main.key");
    let body = format!("provider = \"file\"\npath = \"{}\"", key.display());
    let config = support::write_config(
        dir.path(),
        &socket,
        "main",
        &[("main", body)],
        "api_version = \"v2beta1\"",
    );
    let config = config.to_string_lossy().into_owned();
    let out = support::run_cli(&["keygen", "--config", &config, "--key", "main"], &[]);
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    run_go_expecting(&plugin, "", "v2beta1");
    assert_rewritten(&plugin, true);
}

/// `endpoint: unix:///@name`: the apiserver dials "@name", which is also the authority
/// before 1.32.
#[tokio::test]
async fn grpc_go_on_an_abstract_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = on_abstract_socket(dir.path()).await;
    run_go(&plugin, "");
    run_go(&plugin, "localhost");
}

/// Python grpcio's defaults: a percent-encoded socket path as `:authority`.
#[tokio::test]
async fn python_grpcio_with_default_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let plugin = Plugin::embedded(dir.path(), &socket).await;
    run_python(&plugin);
    assert_rewritten(&plugin, true);
}

/// grpcio's `unix-abstract:` target.
#[tokio::test]
async fn python_grpcio_on_an_abstract_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = on_abstract_socket(dir.path()).await;
    run_python(&plugin);
}

fn raw_connect(socket: &str) -> UnixStream {
    match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).expect("addr");
            UnixStream::connect_addr(&addr).expect("connect")
        }
        None => UnixStream::connect(socket).expect("connect"),
    }
}

/// Junk on the socket costs that one connection, never the plugin.
#[tokio::test]
async fn garbage_on_the_socket_leaves_the_plugin_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let mut plugin = Plugin::embedded(dir.path(), &socket).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice();
    let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    // A HEADERS frame (stream 1, END_HEADERS) whose block is an invalid HPACK index.
    let bad_headers = [0, 0, 1, 1, 4, 0, 0, 0, 1, 0xff].as_slice();
    // A frame header announcing 16 MiB that never arrives.
    let huge_frame = [0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1].as_slice();
    let inputs: Vec<Vec<u8>> = vec![
        random.clone(),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        preface[..10].to_vec(),
        [preface, &random].concat(),
        [preface, &[0, 0, 0, 4, 0, 0, 0, 0, 0], bad_headers].concat(),
        [preface, huge_frame].concat(),
    ];
    for junk in &inputs {
        let mut conn = raw_connect(&socket);
        // The server may hang up mid-write; that is fine.
        let _ = conn.write_all(junk);
        drop(conn);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        plugin.try_wait().is_none(),
        "plugin died:\n{}",
        plugin.output()
    );
    let mut client = plugin.client().await;
    assert_eq!(support::status(&mut client).await.healthz, "ok");
    let seed = support::seed();
    let sealed = support::encrypt(&mut client, &seed).await;
    assert_eq!(support::decrypt(&mut client, &sealed).await, seed);
}
