//! Records what `costwatch_build_info` reports: the git revision the binary was built from and
//! the compiler's version. Both fall back to "unknown" (a source tarball, a container build
//! without .git) rather than failing the build.

use std::process::Command;

fn main() {
    println!("cargo:rustc-env=COSTWATCH_GIT_REVISION={}", revision());
    println!("cargo:rustc-env=COSTWATCH_RUSTC_VERSION={}", rustc_version());
}

fn revision() -> String {
    // A build without .git (the Dockerfile's) is told the revision from outside.
    println!("cargo:rerun-if-env-changed=COSTWATCH_BUILD_REVISION");
    if let Ok(rev) = std::env::var("COSTWATCH_BUILD_REVISION") {
        if !rev.trim().is_empty() {
            return rev.trim().to_owned();
        }
    }
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Rebuild when HEAD moves: HEAD itself changes on checkout, the branch's ref on commit.
    // `--git-path` resolves both inside a worktree too, where .git is a file.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    // No "-dirty" suffix: the script reruns when HEAD moves, not when a file is edited, so the
    // flag would be stale as often as right.
    rev
}

fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// One git command's trimmed output, or `None` when git or the repository is missing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}
