//! The README's shell blocks, run as written, so that they cannot rot.
//!
//! The ```` ```sh ```` blocks of README.md run in order in one shell, in a
//! fresh directory, as a new user would paste them into one terminal, with
//! `bash -e` standing for the user who stops at the first failing command.
//! What the machine of a new user would have and this test provides
//! instead:
//!
//! - the build: `target/release/junction` in the block's directory is the
//!   `junction` binary under test, and a `cargo` on the `PATH` answers
//!   `cargo build --release` (the build is done) and refuses anything else;
//! - a private `$XDG_RUNTIME_DIR` and `$HOME`, so that the default socket is
//!   the block's own.
//!
//! Each line that says what it prints (`… # -> hello`) must print it.
//!
//! The first block (`cargo run … demo`, `cargo test --workspace`) is what CI
//! itself runs (`.ci/run`), so it is not run again here. A block marked
//! `<!-- not run: why -->` on the line before it is skipped, and says why.
//! Whatever the blocks leave running is killed when they end: the shell is
//! its own process group.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use junction_tests::{TempDir, junction_bin};

/// How long the blocks may take, all together.
const PATIENCE: Duration = Duration::from_secs(120);

/// What the script prints before each block, to tell which one failed.
const MARK: &str = "::README.md:";

/// A shell block of the README: the line it starts on, and its text.
struct Block {
    line: usize,
    text: String,
}

/// The `sh` blocks of `markdown`, except those marked not to run.
fn shell_blocks(markdown: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut blocks = Vec::new();
    let mut skipped = Vec::new();
    let mut current: Option<Block> = None;
    let mut previous = "";
    let mut skip: Option<String> = None;
    for (i, line) in markdown.lines().enumerate() {
        match current.as_mut() {
            Some(_) if line.trim_start().starts_with("```") => {
                let block = current.take().unwrap_or_else(|| unreachable!());
                match skip.take() {
                    Some(why) => skipped.push((block.line, why)),
                    None => blocks.push(block),
                }
            }
            Some(block) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            None if line.trim() == "```sh" => {
                skip = previous
                    .trim()
                    .strip_prefix("<!-- not run:")
                    .and_then(|rest| rest.strip_suffix("-->"))
                    .map(|why| why.trim().to_string());
                current = Some(Block {
                    line: i + 1,
                    text: String::new(),
                });
            }
            None => {}
        }
        previous = line;
    }
    (blocks, skipped)
}

/// A directory laid out as a checkout where `cargo build --release` was
/// run: the binary under test as `target/release/junction`, and a `cargo`
/// that only builds.
fn checkout(dir: &Path) -> PathBuf {
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(junction_bin(), release.join("junction")).unwrap();
    let bin = dir.join(".test-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let cargo = bin.join("cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\n\
         # The README test built junction already.\n\
         [ \"$*\" = \"build --release\" ] && exit 0\n\
         echo \"the README test's cargo only builds, not: cargo $*\" >&2\n\
         exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

/// Runs `blocks` in order as one script in a fresh checkout; its output,
/// or which block failed and why.
fn run_blocks(blocks: &[Block]) -> Result<String, String> {
    let dir = TempDir::new();
    let bin = checkout(dir.path());
    let runtime = dir.path().join("run");
    let home = dir.path().join("home");
    for d in [&runtime, &home] {
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(d)
            .unwrap();
    }
    let script = dir.path().join("readme.sh");
    let text: String = blocks
        .iter()
        .map(|b| format!("echo '{MARK}{}' >&2\n{}", b.line, b.text))
        .collect();
    std::fs::write(&script, text).unwrap();
    let out = dir.path().join("out.txt");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-e")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("JUNCTION_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&out).unwrap(),
        ))
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id() as i32;
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever the block left running goes with it.
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        // SAFETY: kill(2) on the process group this test made; no memory
        // is involved.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-group, signal);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
    let output = std::fs::read_to_string(&out).unwrap_or_default();
    let last = output
        .rsplit_once(MARK)
        .and_then(|(_, rest)| rest.lines().next())
        .unwrap_or("?");
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => Err(format!(
            "the block at README.md:{last} ended with {s}; the output:\n{output}"
        )),
        None => Err(format!(
            "the block at README.md:{last} ran past {PATIENCE:?}; the output:\n{output}"
        )),
    }
}

#[test]
fn every_shell_block_of_the_readme_runs_as_written() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let (blocks, skipped) = shell_blocks(&text);
    assert!(
        blocks.len() >= 3,
        "the README's shell blocks were not found"
    );
    let first = &blocks[0];
    assert!(
        first
            .text
            .contains("cargo run --release -p junction -- demo")
            && first.text.contains("cargo test --workspace"),
        "the README starts with the demo and test commands, which CI runs"
    );
    for (line, why) in &skipped {
        println!("README.md:{line}: not run: {why}");
    }
    let output = run_blocks(&blocks[1..]).unwrap_or_else(|e| panic!("{e}"));
    // A line that says what it prints (`# -> hello`) prints it.
    for block in &blocks[1..] {
        for expected in block
            .text
            .lines()
            .filter_map(|l| l.split_once("# -> ").map(|(_, e)| e.trim()))
        {
            assert!(
                output.contains(expected),
                "README.md:{}: the output lacks {expected:?}:\n{output}",
                block.line
            );
        }
    }
}

#[test]
fn blocks_are_found_and_marked_ones_skipped() {
    let markdown = "text\n```sh\necho one\n```\n<!-- not run: needs two machines -->\n```sh\necho two\n```\n```toml\nx = 1\n```\n";
    let (blocks, skipped) = shell_blocks(markdown);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].text, "echo one\n");
    assert_eq!(blocks[0].line, 2);
    assert_eq!(skipped, vec![(6, "needs two machines".to_string())]);
}
