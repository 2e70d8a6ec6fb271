//! `vmcri-initramfs`: packs an init binary and extra files into an
//! uncompressed cpio (newc) initramfs.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use vmcri_initramfs::Initramfs;

/// Build an uncompressed initramfs for a vmcri guest.
#[derive(Debug, Parser)]
#[command(name = "vmcri-initramfs", version)]
struct Args {
    /// The binary to run as /init.
    #[arg(long)]
    init: PathBuf,
    /// Extra host file to include, as SRC:DEST (DEST relative to the root).
    #[arg(long = "file", value_name = "SRC:DEST")]
    files: Vec<String>,
    /// Output archive.
    #[arg(long, short)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut archive = Initramfs::new();
    archive.with_skeleton()?;
    archive.host_file("init", &args.init)?;
    for spec in &args.files {
        let Some((src, dest)) = spec.split_once(':') else {
            bail!("--file {spec:?}: expected SRC:DEST");
        };
        archive.host_file(dest, src.as_ref())?;
    }
    let tmp = args.out.with_extension("tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    archive.write_to(std::io::BufWriter::new(file))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("rename to {}", args.out.display()))?;
    Ok(())
}
