//! Publishing a signed checkpoint outside the log: `dir/checkpoint` and the copy directory's
//! `checkpoint` (each replaced atomically: temp file, fsync, rename, fsync the directory), and
//! `checkpoint_command` with the note on stdin, run on a thread of its own so a slow or hung
//! command never holds up the writer.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A command that has not finished by then is killed (the next checkpoint runs it again).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `note` to `dir/checkpoint` so that a reader sees the old note or the new one, never
/// a mix, and a crash leaves one of the two.
pub fn replace_checkpoint_file(dir: &Path, note: &str) -> std::io::Result<()> {
    let tmp = dir.join(".checkpoint.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(note.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join("checkpoint"))?;
    super::segment::sync_dir(dir)
}

/// Runs the checkpoint command for the newest note handed to it, one run at a time.
pub struct CommandRunner {
    tx: Option<mpsc::Sender<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CommandRunner {
    pub fn new(argv: Vec<String>) -> std::io::Result<CommandRunner> {
        if argv.is_empty() {
            return Ok(CommandRunner { tx: None, thread: None });
        }
        let (tx, rx) = mpsc::channel::<String>();
        let thread = std::thread::Builder::new().name("phigate-audit-cmd".into()).spawn(move || {
            while let Ok(mut note) = rx.recv() {
                // Only the newest note matters: it covers everything the older ones did.
                while let Ok(newer) = rx.try_recv() {
                    note = newer;
                }
                if let Err(e) = run_once(&argv, &note) {
                    eprintln!("phigate: audit checkpoint_command {:?} failed: {e}", argv[0]);
                }
            }
        })?;
        Ok(CommandRunner { tx: Some(tx), thread: Some(thread) })
    }

    pub fn submit(&self, note: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(note.to_string());
        }
    }

    /// Lets the last submitted note's run finish, then stops the thread.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_once(argv: &[String], note: &str) -> Result<(), String> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that ignores its input must not fail the run.
        let _ = stdin.write_all(note.as_bytes());
    }
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => return Err(format!("exited with {status}")),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {} s; killed", COMMAND_TIMEOUT.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
