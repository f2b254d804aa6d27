//! Man pages and shell completions generated from the clap definitions of the
//! command line (run by the packaging as `dps-agent generate-docs --out DIR`,
//! which clap does not list), so they cannot drift from `--help`. Writes only
//! into the directory it is given.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Man page section: the daemon and its administration commands.
pub const SECTION: &str = "8";

/// Errors writing the generated files.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct DocsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DocsError + '_ {
    move |source| DocsError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes into `out`: `man/dps-agent.8` and one page per visible subcommand
/// (`man/dps-agent-run.8`, …), and `completions/dps-agent.bash`,
/// `completions/_dps-agent` (zsh) and `completions/dps-agent.fish`. Returns
/// the files written.
pub fn generate(cmd: Command, out: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();

    let man_dir = out.join("man");
    fs::create_dir_all(&man_dir).map_err(io_err(&man_dir))?;
    man_pages(&cmd, &man_dir, &mut written)?;

    let comp_dir = out.join("completions");
    fs::create_dir_all(&comp_dir).map_err(io_err(&comp_dir))?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = comp_dir.join(file);
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
        fs::write(&path, buf).map_err(io_err(&path))?;
        written.push(path);
    }
    Ok(written)
}

fn man_pages(cmd: &Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), DocsError> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, written)?;
    }
    // After `build()` a subcommand's display name is `dps-agent-run` etc.
    let page = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let path = dir.join(format!("{page}.{SECTION}"));
    let man = clap_mangen::Man::new(cmd.clone())
        .title(page.to_uppercase())
        .section(SECTION)
        .manual("dps-agent manual")
        .source(format!("dps-agent {}", env!("CARGO_PKG_VERSION")));
    let mut buf = Vec::new();
    man.render(&mut buf).map_err(io_err(&path))?;
    let mut f = fs::File::create(&path).map_err(io_err(&path))?;
    f.write_all(&buf).map_err(io_err(&path))?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    #[test]
    fn writes_a_page_per_visible_command_and_three_completions() {
        let cmd = Command::new("dps-agent")
            .about("Gives this gateway its identity.")
            .version("1.0")
            .arg(Arg::new("config").long("config").action(ArgAction::Set))
            .subcommand(Command::new("run").about("Run the daemon."))
            .subcommand(Command::new("secret-tool").hide(true));
        let out = std::env::temp_dir().join(format!("docs-{}", rand::random::<u64>()));
        let files = generate(cmd, &out).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(&out).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "man/dps-agent-run.8",
                "man/dps-agent.8",
                "completions/dps-agent.bash",
                "completions/_dps-agent",
                "completions/dps-agent.fish"
            ]
        );
        let page = fs::read_to_string(out.join("man/dps-agent.8")).unwrap();
        assert!(page.contains(".TH DPS-AGENT 8"), "{page}");
        assert!(page.contains("\\-\\-config"), "{page}");
        assert!(
            !page.contains("secret"),
            "hidden commands stay hidden: {page}"
        );
        let bash = fs::read_to_string(out.join("completions/dps-agent.bash")).unwrap();
        assert!(bash.contains("--config") && bash.contains("run"), "{bash}");
        let _ = fs::remove_dir_all(&out);
    }
}
