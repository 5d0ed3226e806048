//! `vmig demo`: two local agents, a busy VM, a live migration, the report and the proof.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use vmig::api::local::{self, LocalAgent};
use vmig::api::{self, Request};
use vmig::dirty::DirtyTracking;
use vmig::inventory::VmDef;
use vmig::migrate::MigrateOptions;

/// Options of the demo.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Working set the dirty vCPU writes, MiB.
    #[arg(long, default_value_t = 64)]
    dirty_mib: u64,
    /// Pages per second the dirty vCPU writes (0 = flat out).
    #[arg(long, default_value_t = 0)]
    dirty_rate: u64,
    /// Largest acceptable downtime, ms.
    #[arg(long, default_value_t = vmig::migrate::defaults::MAX_DOWNTIME_MS)]
    max_downtime: f64,
    /// Keep the demo's folder (agents' datastores and logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Print the report and the proof as one JSON object on stdout (the narration goes to
    /// stderr).
    #[arg(long)]
    json: bool,
}

struct Agents {
    children: Vec<Child>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: sends SIGTERM to a child process we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn wait_for_agent(sock: &Path) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(api::Reply::Ok(_)) = api::client::call(sock, &Request::Ping).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("agent at {} did not come up", sock.display())
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vmig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let run_dir = dir.join("run");
    std::env::set_var("VMIG_RUN_DIR", &run_dir);
    let (pa, pb) = (local::free_port()?, local::free_port()?);
    let hosts = dir.join("hosts.toml");
    std::fs::write(&hosts, local::hosts_text(&[("hostA", pa), ("hostB", pb)]))?;
    let exe = std::env::current_exe()?;
    // A cluster CA and a certificate per agent: the demo migrates over mutual TLS.
    let pki = dir.join("pki");
    vmig::certs::cluster(&pki, &["hostA", "hostB"])?;
    let mut agents = Agents {
        children: Vec::new(),
        dir: dir.clone(),
        keep: a.keep,
    };
    for (name, port) in [("hostA", pa), ("hostB", pb)] {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = LocalAgent {
            name: name.into(),
            port,
            datastore: dir.join(name),
            hosts: hosts.clone(),
            run_dir: run_dir.clone(),
            pki_dir: Some(pki.clone()),
        }
        .command(&exe)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn an agent")?;
        agents.children.push(child);
    }
    let (sa, sb) = (api::socket_of("hostA"), api::socket_of("hostB"));
    wait_for_agent(&sa).await?;
    wait_for_agent(&sb).await?;
    // Narration: stdout for people, stderr when stdout carries the JSON.
    let json = a.json;
    let say = |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(format!(
        "agents: hostA (127.0.0.1:{pa}) and hostB (127.0.0.1:{pb}), mutual TLS (CA and certificates in {}), folder {}",
        pki.display(),
        dir.display()
    ));

    let def = VmDef {
        name: "vm1".into(),
        memory_mib: a.memory_mib,
        vcpus: 2,
        workload: vec!["dirty".into(), "counter".into()],
        dirty_mib: a.dirty_mib,
        dirty_rate: a.dirty_rate,
        dirty_tracking: DirtyTracking::Auto,
        disk_mib: 16,
        disk_rate: 0,
        disk_region_mib: 0,
        generation: 0,
    };
    super::expect_ok(
        &sa,
        Request::Create {
            def,
            datastore: None,
        },
    )
    .await?;
    super::expect_ok(&sa, Request::Start { name: "vm1".into() }).await?;
    say(format!(
        "vm1 on hostA: {} MiB, vCPU0 dirty ({} MiB working set, {}), vCPU1 counter",
        a.memory_mib,
        a.dirty_mib,
        if a.dirty_rate == 0 {
            "flat out".to_string()
        } else {
            format!("{} pages/s", a.dirty_rate)
        }
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = super::show(&sa, "vm1").await?;
    let s = before.stats.clone().unwrap_or_default();
    say(format!(
        "before: counter {} , {} pages written by the guest",
        s.counter, s.dirty_pages_written
    ));

    let opts = MigrateOptions {
        max_downtime_ms: a.max_downtime,
        verify: true,
        ..Default::default()
    };
    let report = super::run_migration(
        &sa,
        "vm1",
        Request::Migrate {
            name: "vm1".into(),
            dest: "hostB".into(),
            opts,
        },
        !a.json,
    )
    .await?;
    if !json {
        print!("{}", report.render());
    }

    // The proof: digests equal, the VM left hostA, the counter goes on on hostB.
    let v = report
        .verification
        .clone()
        .context("the report has no verification")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after1 = super::show(&sb, "vm1").await?.stats.unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after2 = super::show(&sb, "vm1").await?.stats.unwrap_or_default();
    let gone = super::show(&sa, "vm1").await.is_err();
    let counting = after2.counter > after1.counter && after1.counter >= report.counter_at_pause;
    let ok = v.memory_equal && v.vcpus_equal && gone && counting && after2.counter_failures == 0;
    if json {
        let out = serde_json::json!({
            "report": report,
            "proof": {
                "memory_digest_equal": v.memory_equal,
                "vcpu_state_equal": v.vcpus_equal,
                "released_by_source": gone,
                "counter_at_pause": report.counter_at_pause,
                "counter_on_destination": [after1.counter, after2.counter],
                "counter_continues": counting,
                "self_check_failures": after2.counter_failures,
                "ok": ok,
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("proof:");
        println!("  memory digest equal at the pause: {}", v.memory_equal);
        println!("  vCPU state equal after restore:   {}", v.vcpus_equal);
        println!("  vm1 released by hostA:            {gone}");
        println!(
            "  counter: {} at the pause, {} then {} on hostB, {} failed self-checks",
            report.counter_at_pause, after1.counter, after2.counter, after2.counter_failures
        );
        println!("  counter continues on hostB:       {counting}");
    }
    if !ok {
        bail!("the proof failed");
    }
    say("demo OK".into());
    Ok(())
}
