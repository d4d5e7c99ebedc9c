//! What an attacker with a memory dump of the running plugin would find: the real binary on
//! a real socket with a file root serves Encrypts and Decrypts of known DEK seeds and rotates
//! its local KEK (so the first one is retired and evicted from the cache); then every readable
//! mapping of the process is read through /proc/PID/mem and searched for the seeds, the root
//! key and the evicted local KEK. The numbers found are printed (`--nocapture`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use kms_plugin::envelope::annotations;
use kms_plugin::proto::v2::EncryptResponse;
use kms_plugin::root::file::FileRoot;
use kms_plugin::root::{RootKey, WrapContext};

use crate::support::{self, Plugin};

/// Tracked calls: Encrypts, then a Decrypt of each.
const CALLS: usize = 200;
/// The smallest `[local_kek] max_encryptions`: the first local KEK retires after this many.
const MAX_ENCRYPTIONS: usize = 1000;
/// Live copies of a local KEK in use: its key schedule, shared by the cache and Encrypt.
const LOCAL_KEK_LIVE_COPIES: usize = 1;
/// Calls whose bytes an open connection's read buffer (h2's, 8 KiB, reused from the front)
/// can still hold: each Encrypt here is at least 128 bytes on the wire.
const CONNECTION_BUFFER_CALLS: usize = 8 * 1024 / 128;
/// Live copies of the file root key the README documents: the first two round keys of its
/// AES-256 key schedule are the key itself (AES-NI layout).
const ROOT_KEY_LIVE_COPIES: usize = 1;

/// Counts occurrences of 32-byte needles in memory, filtered by their first two bytes.
struct Needles {
    first: Vec<bool>,
    index: HashMap<[u8; 32], usize>,
    counts: Vec<usize>,
    /// Where each hit was: (needle, mapping line of /proc/PID/maps, offset in it).
    hits: Vec<(usize, String, usize)>,
}

impl Needles {
    fn new(needles: &[[u8; 32]]) -> Self {
        let mut first = vec![false; 1 << 16];
        let mut index = HashMap::new();
        for (i, n) in needles.iter().enumerate() {
            first[usize::from(u16::from_le_bytes([n[0], n[1]]))] = true;
            index.insert(*n, i);
        }
        Self {
            first,
            index,
            counts: vec![0; needles.len()],
            hits: Vec::new(),
        }
    }

    fn scan(&mut self, bytes: &[u8], mapping: &str) {
        if bytes.len() < 32 {
            return;
        }
        for at in 0..=bytes.len() - 32 {
            if !self.first[usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))] {
                continue;
            }
            let window: [u8; 32] = bytes[at..at + 32].try_into().expect("32 bytes");
            if let Some(&i) = self.index.get(&window) {
                self.counts[i] += 1;
                self.hits.push((i, mapping.to_string(), at));
            }
        }
    }
}

/// Reads every readable mapping of `pid` (as root, also a non-dumpable process's) and
/// counts the needles in it. Returns the bytes read.
fn scan_process(pid: u32, needles: &mut Needles) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut total = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').expect("range");
        let start = u64::from_str_radix(start, 16).expect("start");
        let end = u64::from_str_radix(end, 16).expect("end");
        let mut region = vec![0u8; usize::try_from(end - start).expect("size")];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue; // e.g. a mapping that went away meanwhile
        }
        total += region.len();
        needles.scan(&region, line);
    }
    assert!(total > 0, "nothing readable in /proc/{pid}/mem");
    total
}

fn seed() -> [u8; 32] {
    support::seed().try_into().expect("32 bytes")
}

/// The local KEK an EncryptResponse was sealed under, unwrapped with the root key file.
async fn local_kek(root: &FileRoot, sealed: &EncryptResponse) -> [u8; 32] {
    let wrapped = &sealed.annotations[&annotations::wrapped_kek_key(root.key_id().as_str())];
    let kek = root
        .unwrap(wrapped, &WrapContext::new(root.key_id()))
        .await
        .expect("unwrap the local KEK with the root key file");
    *kek.expose_secret()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_seed_or_retired_key_left_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = support::socket_in(dir.path());
    let extra = format!("[local_kek]\nmax_encryptions = {MAX_ENCRYPTIONS}\n[cache]\ncapacity = 1");
    let config = support::file_root_config(dir.path(), &socket, &extra);
    let key_path = dir.path().join("main.key");
    let root_key: [u8; 32] = std::fs::read(&key_path)
        .expect("read root key")
        .try_into()
        .expect("32-byte root key");
    let root = FileRoot::open(&key_path).await.expect("open root key");
    let plugin = Plugin::start(&socket, &["--config", &config], &[], dir.path()).await;
    let pid = plugin.pid().expect("pid");

    // CALLS Encrypts and Decrypts under the first local KEK, then enough Encrypts to use it
    // up: its successor (prepared at 80 %) pushes it out of the one-entry cache and then
    // takes over, so the first local KEK is retired and evicted.
    let mut seeds = Vec::new();
    let mut client = plugin.client().await;
    let mut sealed = Vec::new();
    for _ in 0..CALLS {
        let s = seed();
        sealed.push(support::encrypt(&mut client, &s).await);
        seeds.push(s);
    }
    for (s, e) in seeds.iter().zip(&sealed) {
        assert_eq!(&support::decrypt(&mut client, e).await[..], s);
    }
    let first_kek = local_kek(&root, &sealed[0]).await;
    let mut last = None;
    for _ in CALLS..=MAX_ENCRYPTIONS {
        let s = seed();
        last = Some(support::encrypt(&mut client, &s).await);
        seeds.push(s);
    }
    let second_kek = local_kek(&root, &last.expect("encrypted")).await;
    assert_ne!(
        first_kek, second_kek,
        "the first local KEK was not replaced"
    );
    // While the connection is open, its buffers (h2's and tonic's, reused from call to call)
    // may still hold the last calls' bytes: measured and bounded, not zero.
    let mut open = Needles::new(&seeds);
    scan_process(pid, &mut open);
    let held: Vec<usize> = (0..seeds.len()).filter(|&i| open.counts[i] > 0).collect();
    println!(
        "connection open: seeds of calls {held:?} (of {}) still in memory",
        seeds.len()
    );
    for (i, mapping, at) in open.hits.iter().take(5) {
        println!("  seed {i} at +{at:#x} in {mapping}");
    }
    assert!(
        held.iter()
            .all(|&i| i + CONNECTION_BUFFER_CALLS >= seeds.len()),
        "an open connection holds seeds older than its last {CONNECTION_BUFFER_CALLS} calls: {held:?}"
    );
    // A reload opens the root key again and replaces the second local KEK with a third.
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(out.status.success(), "reload: {out:?}");
    let s = seed();
    let current_kek = local_kek(&root, &support::encrypt(&mut client, &s).await).await;
    seeds.push(s);
    assert_ne!(second_kek, current_kek, "the reload kept the local KEK");
    // Connection buffers are the client's to end: close it, as kube-apiserver's would at a
    // restart, and give the plugin a moment to drop the connection.
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut needles: Vec<[u8; 32]> = seeds.clone();
    needles.extend([root_key, first_kek, second_kek, current_kek]);
    let mut found = Needles::new(&needles);
    let bytes = scan_process(pid, &mut found);
    let counts = &found.counts;
    let tracked = counts[..CALLS].iter().filter(|&&c| c > 0).count();
    let filler = counts[CALLS..seeds.len()]
        .iter()
        .filter(|&&c| c > 0)
        .count();
    let copies: usize = counts[..seeds.len()].iter().sum();
    let [root_copies, evicted_copies, replaced_copies, current_copies] =
        counts[seeds.len()..].try_into().expect("four keys");
    println!(
        "memory scan of pid {pid}: {bytes} bytes read; seeds found: {tracked} of {CALLS} \
         encrypted+decrypted, {filler} of {} encrypted only ({copies} copies); root key: \
         {root_copies} copies; evicted local KEK: {evicted_copies}; local KEK replaced by a reload: \
         {replaced_copies}; current local KEK: {current_copies}",
        seeds.len() - CALLS
    );
    for (i, mapping, at) in found.hits.iter().take(20) {
        let what = match i.checked_sub(seeds.len()) {
            None => "seed",
            Some(0) => "root key",
            Some(1) => "evicted local KEK",
            Some(2) => "local KEK replaced by the reload",
            Some(_) => "current local KEK",
        };
        println!("  {what} at +{at:#x} in {mapping}");
    }
    assert_eq!(tracked + filler, 0, "DEK seeds of finished calls in memory");
    assert!(
        root_copies <= ROOT_KEY_LIVE_COPIES,
        "{root_copies} copies of the root key, documented: {ROOT_KEY_LIVE_COPIES}"
    );
    assert!(
        root_copies >= 1,
        "the scan did not even find the root key's live copy: is it reading the process?"
    );
    assert!(
        current_copies <= LOCAL_KEK_LIVE_COPIES,
        "{current_copies} copies of the current local KEK, documented: {LOCAL_KEK_LIVE_COPIES}"
    );
    assert_eq!(
        evicted_copies, 0,
        "the evicted local KEK is still in memory"
    );
    assert_eq!(
        replaced_copies, 0,
        "the local KEK a reload replaced is still in memory"
    );
}
