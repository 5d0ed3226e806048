//! Writes the fuzz targets' seed corpus: `cargo run -p vmig --example fuzz_seeds -- fuzz/corpus`
//! (one folder per target, one file per seed: real encodings from `vmig::fuzzing::seeds`).

fn main() -> std::io::Result<()> {
    let root = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (i, (target, seed)) in vmig::fuzzing::seeds().into_iter().enumerate() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{i}")), seed)?;
    }
    println!("seeds written under {}", root.display());
    Ok(())
}
