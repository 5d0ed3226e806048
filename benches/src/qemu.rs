//! QEMU as the peer: a boot-sector guest doing the work of vmig's `idle` and `dirty`
//! programs, two `qemu-system-x86_64 -accel kvm` processes on this machine, and a migration
//! between them over loopback driven through QMP.
//!
//! The guest is built here, byte by byte, like QEMU's own `tests/migration` a-b bootblock: it
//! enables A20, enters flat 32-bit protected mode, then either halts (`idle`) or adds one to
//! one byte of every 4 KiB page of its working set, pass after pass, writing a `.` to COM1
//! after each pass (`dirty`). Counting the dots in the serial file gives the guest's own
//! dirty rate. Downtime is counted as for vmig: the source's `STOP` event to the
//! destination's `RESUME` event (both QEMUs stamp events with this machine's clock).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Guest-physical start of the `dirty` working set (above the BIOS and the boot sector).
pub const WS_START: u32 = 1 << 20;
const PAGE: u32 = 4096;

/// What the boot-sector guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Print `I` once, then halt.
    Idle,
    /// Rewrite one byte per page of `pages` pages from [`WS_START`], a `.` per pass.
    Dirty {
        /// Working-set pages.
        pages: u32,
    },
}

/// The 512-byte boot sector for `work`.
pub fn boot_sector(work: Work) -> Vec<u8> {
    const ORG: u16 = 0x7c00;
    const GDT: usize = 0x180;
    let mut c: Vec<u8> = Vec::new();
    // 16-bit real mode.
    c.extend([0xfa]); // cli
    c.extend([0x31, 0xc0, 0x8e, 0xd8]); // xor ax,ax ; mov ds,ax
    c.extend([0xe4, 0x92, 0x0c, 0x02, 0xe6, 0x92]); // in al,0x92 ; or al,2 ; out 0x92,al (A20)
    let gdtr = ORG + GDT as u16 + 24;
    c.extend([0x0f, 0x01, 0x16]); // lgdt [gdtr]
    c.extend(gdtr.to_le_bytes());
    c.extend([0x0f, 0x20, 0xc0]); // mov eax,cr0
    c.extend([0x66, 0x83, 0xc8, 0x01]); // or eax,1
    c.extend([0x0f, 0x22, 0xc0]); // mov cr0,eax
    let far = c.len();
    c.extend([0xea, 0, 0, 0x08, 0x00]); // jmp 0x08:pm32 (offset patched below)
    let pm32 = ORG + c.len() as u16;
    c[far + 1..far + 3].copy_from_slice(&pm32.to_le_bytes());
    // 32-bit protected mode, flat segments.
    c.extend([0x66, 0xb8, 0x10, 0x00]); // mov ax,0x10
    c.extend([0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0]); // mov ds,ax ; mov es,ax ; mov ss,ax
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx,0x3f8
    match work {
        Work::Idle => {
            c.extend([0xb0, b'I', 0xee]); // mov al,'I' ; out dx,al
            c.extend([0xf4, 0xeb, 0xfd]); // hlt ; jmp back to hlt
        }
        Work::Dirty { pages } => {
            let end = WS_START + pages * PAGE;
            let outer = c.len();
            c.push(0xb8); // mov eax, WS_START
            c.extend(WS_START.to_le_bytes());
            let inner = c.len();
            c.extend([0xfe, 0x00]); // inc byte [eax]
            c.extend([0x05]); // add eax, 4096
            c.extend(PAGE.to_le_bytes());
            c.push(0x3d); // cmp eax, end
            c.extend(end.to_le_bytes());
            let rel = inner as isize - (c.len() as isize + 2);
            c.extend([0x72, rel as i8 as u8]); // jb inner
            c.extend([0xb0, b'.', 0xee]); // mov al,'.' ; out dx,al
            let rel = outer as isize - (c.len() as isize + 2);
            c.extend([0xeb, rel as i8 as u8]); // jmp outer
        }
    }
    assert!(c.len() <= GDT, "boot code overlaps the GDT");
    c.resize(GDT, 0x90);
    c.extend([0u8; 8]); // null descriptor
    c.extend([0xff, 0xff, 0, 0, 0, 0x9a, 0xcf, 0]); // 0x08: code, base 0, 4 GiB, 32-bit
    c.extend([0xff, 0xff, 0, 0, 0, 0x92, 0xcf, 0]); // 0x10: data, base 0, 4 GiB
    c.extend(23u16.to_le_bytes()); // GDTR limit
    c.extend((ORG as u32 + GDT as u32).to_le_bytes()); // GDTR base
    c.resize(510, 0);
    c.extend([0x55, 0xaa]);
    c
}

/// Installs QEMU from Debian if `qemu-system-x86_64` is missing. Returns its version line.
pub fn ensure_qemu() -> Result<String, String> {
    let version = || {
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    eprintln!("$ apt-get install -y qemu-system-x86");
    let ok = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "qemu-system-x86",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("cannot install qemu-system-x86 (apt-get failed)".into());
    }
    version().ok_or_else(|| "qemu-system-x86_64 still missing after apt-get".into())
}

/// A QMP connection: commands in, replies and events out (events kept with their time).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far: (name, seconds since the epoch from QEMU's timestamp).
    pub events: Vec<(String, f64)>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(20) => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            writer: s,
            events: Vec::new(),
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}"))
    }

    /// Runs `execute` with `arguments`; returns its `return` value.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let mut req =
            serde_json::to_vec(&json!({"execute": execute, "arguments": arguments})).expect("json");
        req.push(b'\n');
        self.writer.write_all(&req).map_err(|e| e.to_string())?;
        loop {
            let v = self.read()?;
            if let Some(ev) = v.get("event").and_then(Value::as_str) {
                let ts = &v["timestamp"];
                let t = ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                self.events.push((ev.to_string(), t));
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("{execute}: {}", v["error"]));
        }
    }

    /// The time of the first event `name` seen, polling with `query-status` until it came.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<f64, String> {
        let t = Instant::now();
        loop {
            if let Some((_, at)) = self.events.iter().find(|(n, _)| n == name) {
                return Ok(*at);
            }
            if t.elapsed() > timeout {
                return Err(format!("no {name} event within {timeout:?}"));
            }
            self.cmd("query-status", json!({}))?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One QEMU process with its QMP socket and serial file.
pub struct Qemu {
    child: Child,
    /// QMP.
    pub qmp: Qmp,
    /// The guest's COM1 output.
    pub serial: PathBuf,
}

impl Qemu {
    /// Starts QEMU with `mem_mib` of memory booting `disk`; `incoming`: wait for a migration.
    pub fn start(
        dir: &Path,
        name: &str,
        disk: &Path,
        mem_mib: u64,
        incoming: bool,
    ) -> Result<Qemu, String> {
        let qmp = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let _ = std::fs::remove_file(&qmp);
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "kvm", "-smp", "1", "-nodefaults"])
            .args(["-m", &mem_mib.to_string()])
            .args(["-display", "none", "-vga", "none"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let qmp = Qmp::connect(&qmp)?;
        Ok(Qemu { child, qmp, serial })
    }

    /// Bytes the guest wrote to COM1 so far.
    pub fn serial_len(&self) -> u64 {
        std::fs::metadata(&self.serial)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Waits until the guest wrote at least `n` bytes to COM1.
    pub fn wait_serial(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let t = Instant::now();
        while self.serial_len() < n {
            if t.elapsed() > timeout {
                return Err(format!(
                    "the guest wrote {} of {n} serial bytes in {timeout:?}",
                    self.serial_len()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QEMU-to-QEMU migration's figures.
#[derive(Debug, Clone, Default)]
pub struct QemuRun {
    /// `query-migrate` total-time, ms.
    pub total_ms: f64,
    /// Source STOP to destination RESUME, ms.
    pub downtime_ms: f64,
    /// QEMU's own (source-side) downtime field, ms.
    pub qemu_downtime_ms: f64,
    /// RAM bytes transferred.
    pub bytes: u64,
    /// The guest's dirty rate before the migration, pages/s (0 for idle).
    pub guest_pages_per_s: f64,
    /// Whether the guest went on on the destination (serial output grew).
    pub continued: bool,
    /// The full `query-migrate` answer.
    pub info: Value,
}

/// Migrates a fresh QEMU guest doing `work` with `mem_mib` of memory between two QEMU
/// processes over loopback. `caps`: extra migration capabilities set on both sides;
/// `params`: `migrate-set-parameters` on the source (and `multifd-channels` on both).
pub fn migrate(
    dir: &Path,
    work: Work,
    mem_mib: u64,
    caps: &[&str],
    params: Value,
    postcopy_after_first_pass: bool,
) -> Result<QemuRun, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let disk = dir.join("boot.img");
    let mut img = boot_sector(work);
    img.resize(1 << 20, 0);
    std::fs::write(&disk, img).map_err(|e| e.to_string())?;
    let port = vmig::api::local::free_port().map_err(|e| e.to_string())?;
    let mut src = Qemu::start(dir, "src", &disk, mem_mib, false)?;
    let mut dst = Qemu::start(dir, "dst", &disk, mem_mib, true)?;
    // Booted (SeaBIOS takes seconds under emulation), and for `dirty` two passes made.
    src.wait_serial(1, Duration::from_secs(60))?;
    let mut guest_pages_per_s = 0.0;
    if let Work::Dirty { pages } = work {
        src.wait_serial(2, Duration::from_secs(60))?;
        let (n0, t0) = (src.serial_len(), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let passes = (src.serial_len() - n0) as f64;
        guest_pages_per_s = passes * pages as f64 / t0.elapsed().as_secs_f64();
    }
    let mut all_caps = vec!["events"];
    all_caps.extend_from_slice(caps);
    let capabilities: Vec<Value> = all_caps
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    for q in [&mut src.qmp, &mut dst.qmp] {
        q.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": capabilities}),
        )?;
    }
    if let Some(n) = params.get("multifd-channels") {
        dst.qmp
            .cmd("migrate-set-parameters", json!({"multifd-channels": n}))?;
    }
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.qmp.cmd("migrate-incoming", json!({"uri": uri}))?;
    src.qmp.cmd("migrate-set-parameters", params)?;
    src.qmp.cmd("migrate", json!({"uri": uri}))?;
    let t = Instant::now();
    let mut switched = false;
    let info = loop {
        let v = src.qmp.cmd("query-migrate", json!({}))?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => break (v, t.elapsed()),
            "failed" | "cancelled" => return Err(format!("QEMU migration {}: {v}", v["status"])),
            _ => {}
        }
        if postcopy_after_first_pass
            && !switched
            && v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
        {
            src.qmp.cmd("migrate-start-postcopy", json!({}))?;
            switched = true;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!("QEMU migration did not finish in 600 s: {v}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stop = src.qmp.wait_event("STOP", Duration::from_secs(10))?;
    let resume = dst.qmp.wait_event("RESUME", Duration::from_secs(30))?;
    let n = dst.serial_len();
    let continued = match work {
        Work::Idle => true,
        Work::Dirty { .. } => dst.wait_serial(n + 1, Duration::from_secs(30)).is_ok(),
    };
    let (info, waited) = info;
    Ok(QemuRun {
        // QEMU's own figure; where it says 0 (QEMU 7.2 did in every run of the dirty row,
        // 2026-12-04) the time from `migrate` to the poll that saw `completed` stands in (at
        // most one 5 ms poll late).
        total_ms: info["total-time"]
            .as_f64()
            .filter(|&ms| ms > 0.0)
            .unwrap_or(waited.as_secs_f64() * 1e3),
        downtime_ms: (resume - stop) * 1e3,
        qemu_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        guest_pages_per_s,
        continued,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sectors_are_512_bytes_with_the_signature_and_the_working_set() {
        for w in [Work::Idle, Work::Dirty { pages: 16384 }] {
            let b = boot_sector(w);
            assert_eq!(b.len(), 512);
            assert_eq!(&b[510..], &[0x55, 0xaa]);
        }
        let b = boot_sector(Work::Dirty { pages: 16384 });
        let end = (WS_START + 16384 * PAGE).to_le_bytes();
        assert!(
            b.windows(5).any(|w| w[0] == 0x3d && w[1..] == end),
            "cmp eax, end"
        );
    }
}
