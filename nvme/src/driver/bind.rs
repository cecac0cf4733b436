//! Finding an NVMe controller by serial number or PCI address, and handing it from
//! the kernel's driver to vfio-pci and back, through sysfs.
//!
//! Binding is refused when a namespace of the controller is mounted, used as swap or
//! held by another block device (device-mapper, md): taking it from the kernel would
//! pull a disk out from under a filesystem. The original driver is remembered and
//! restored when the [`Binding`] is dropped.
//!
//! No `unsafe` here: sysfs writes only.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// PCI class code of an NVMe controller: mass storage (01), NVM (08), NVMe (02).
const NVME_CLASS: &str = "0x010802";

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("no NVMe controller matches {0:?} (give a PCI address like 0000:01:00.0 or a serial number from /sys/class/nvme/*/serial){list}", list = describe_controllers())]
    NotFound(String),
    #[error("{pci} is not an NVMe controller (PCI class {class})")]
    NotNvme { pci: String, class: String },
    #[error("refusing to take {pci} from the kernel: {why}")]
    InUse { pci: String, why: String },
    #[error("{what}: {source}")]
    Sysfs {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn sysfs(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BindError {
    let what = what.into();
    move |source| BindError::Sysfs { what, source }
}

/// Normalises a PCI address: `01:00.0` → `0000:01:00.0`; `None` if it is not one.
pub fn parse_pci_address(s: &str) -> Option<String> {
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let (dom, rest) = full.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |x: &str, n: usize| x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit());
    let ok = hex(dom, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && func.chars().all(|c| ('0'..='7').contains(&c));
    ok.then(|| full.to_ascii_lowercase())
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The driver a PCI device is bound to, if any.
pub fn current_driver(pci: &str) -> Option<String> {
    fs::read_link(Path::new(PCI_DEVICES).join(pci).join("driver"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Every NVMe controller's PCI address on this machine.
pub fn nvme_controllers() -> Vec<String> {
    let Ok(rd) = fs::read_dir(PCI_DEVICES) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter(|e| read_trim(&e.path().join("class")).as_deref() == Some(NVME_CLASS))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// "; NVMe controllers here: ADDR (driver, serial S), …" for error messages.
fn describe_controllers() -> String {
    let all = nvme_controllers();
    if all.is_empty() {
        return "; this machine has no NVMe controller".into();
    }
    let list: Vec<String> = all
        .iter()
        .map(|p| {
            let driver = current_driver(p).unwrap_or_else(|| "no driver".into());
            match kernel_serial(p) {
                Some(s) => format!("{p} ({driver}, serial {s})"),
                None => format!("{p} ({driver})"),
            }
        })
        .collect();
    format!("; NVMe controllers here: {}", list.join(", "))
}

/// The serial number the kernel's nvme driver reports for a controller it drives.
pub fn kernel_serial(pci: &str) -> Option<String> {
    let dir = Path::new(PCI_DEVICES).join(pci).join("nvme");
    let e = fs::read_dir(dir).ok()?.flatten().next()?;
    // Empty until the driver's probe has run Identify.
    read_trim(&e.path().join("serial")).filter(|s| !s.is_empty())
}

/// What `nvme:SPEC` names: a PCI address, or the serial number of a controller the
/// kernel's nvme driver currently drives. Controllers already bound to vfio-pci can be
/// named by serial only through `vfio_serial` (opening them), which the caller does.
pub enum Target {
    Pci(String),
    /// Not found among kernel-driven controllers; these vfio-bound ones are candidates.
    SerialOnVfio {
        serial: String,
        candidates: Vec<String>,
    },
}

pub fn resolve(spec: &str) -> Result<Target, BindError> {
    if let Some(pci) = parse_pci_address(spec) {
        let dir = Path::new(PCI_DEVICES).join(&pci);
        if !dir.exists() {
            return Err(BindError::NotFound(spec.into()));
        }
        let class = read_trim(&dir.join("class")).unwrap_or_default();
        if class != NVME_CLASS {
            return Err(BindError::NotNvme { pci, class });
        }
        return Ok(Target::Pci(pci));
    }
    let mut all;
    // A controller just given back to the nvme driver shows its serial only once the
    // driver's (asynchronous) probe has finished: wait for those, boundedly.
    // Every miss is retried for 2 s (a controller being rebound can show no serial,
    // or no driver, for a moment), and for up to 30 s while one is visibly probing.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    loop {
        all = nvme_controllers();
        if let Some(pci) = all
            .iter()
            .find(|p| kernel_serial(p).as_deref() == Some(spec))
        {
            return Ok(Target::Pci(pci.clone()));
        }
        // Being probed: bound to nvme (or about to be: no driver yet) without a
        // serial to show.
        let probing = all.iter().any(|p| {
            matches!(current_driver(p).as_deref(), Some("nvme") | None)
                && kernel_serial(p).is_none()
        });
        let settling = start.elapsed() < Duration::from_secs(2);
        if !(probing || settling) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let candidates: Vec<String> = all
        .into_iter()
        .filter(|p| current_driver(p).as_deref() == Some("vfio-pci"))
        .collect();
    if candidates.is_empty() {
        return Err(BindError::NotFound(spec.into()));
    }
    Ok(Target::SerialOnVfio {
        serial: spec.into(),
        candidates,
    })
}

/// Block devices (namespaces and their partitions) the kernel exposes for a controller.
fn block_devices(pci: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(ctrls) = fs::read_dir(Path::new(PCI_DEVICES).join(pci).join("nvme")) else {
        return out;
    };
    for c in ctrls.flatten() {
        let Ok(entries) = fs::read_dir(c.path()) else {
            continue;
        };
        for ns in entries.flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("nvme") && name.contains('n') && ns.path().join("dev").exists()) {
                continue;
            }
            if let Ok(parts) = fs::read_dir(ns.path()) {
                for p in parts.flatten() {
                    let pn = p.file_name().to_string_lossy().into_owned();
                    if pn.starts_with(&name) && p.path().join("partition").exists() {
                        out.push(pn);
                    }
                }
            }
            out.push(name);
        }
    }
    out
}

/// Why the kernel's use of these block devices forbids taking the controller.
fn in_use(devs: &[String]) -> Option<String> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
    for d in devs {
        let dev = format!("/dev/{d}");
        if mounts
            .lines()
            .any(|l| l.split_whitespace().next() == Some(dev.as_str()))
        {
            return Some(format!("{dev} is mounted"));
        }
        if swaps
            .lines()
            .any(|l| l.split_whitespace().next() == Some(dev.as_str()))
        {
            return Some(format!("{dev} is in use as swap"));
        }
        let holders = Path::new("/sys/class/block").join(d).join("holders");
        if fs::read_dir(&holders).is_ok_and(|mut r| r.next().is_some()) {
            return Some(format!(
                "{dev} is held by another block device ({})",
                holders.display()
            ));
        }
    }
    None
}

fn write(path: PathBuf, value: &str) -> Result<(), BindError> {
    fs::write(&path, value).map_err(sysfs(format!("write {value:?} to {}", path.display())))
}

/// A controller bound to vfio-pci by this process; dropping it gives the controller
/// back to the driver it had.
#[derive(Debug)]
pub struct Binding {
    pub pci: String,
    /// The driver it was taken from (`None`: it was already on vfio-pci or unbound).
    pub original: Option<String>,
}

/// Binds `pci` to vfio-pci, unless it already is. Needs root.
pub fn bind_vfio(pci: &str) -> Result<Binding, BindError> {
    let dev = Path::new(PCI_DEVICES).join(pci);
    let original = current_driver(pci);
    if original.as_deref() == Some("vfio-pci") {
        return Ok(Binding {
            pci: pci.into(),
            original: None,
        });
    }
    if let Some(why) = in_use(&block_devices(pci)) {
        return Err(BindError::InUse {
            pci: pci.into(),
            why,
        });
    }
    if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("vfio-pci")
            .status();
        let _ = std::process::Command::new("modprobe")
            .arg("vfio_iommu_type1")
            .status();
        if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
            return Err(BindError::Other(
                "the vfio-pci driver is not available (modprobe vfio-pci failed)".into(),
            ));
        }
    }
    write(dev.join("driver_override"), "vfio-pci")?;
    if original.is_some() {
        write(dev.join("driver/unbind"), pci)?;
    }
    write(PathBuf::from("/sys/bus/pci/drivers_probe"), pci)?;
    let start = Instant::now();
    while current_driver(pci).as_deref() != Some("vfio-pci") {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(BindError::Other(format!(
                "{pci} did not bind to vfio-pci within 5 s (driver now: {})",
                current_driver(pci).unwrap_or_else(|| "none".into())
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(
        pci,
        from = original.as_deref().unwrap_or("none"),
        "bound to vfio-pci"
    );
    Ok(Binding {
        pci: pci.into(),
        original,
    })
}

impl Drop for Binding {
    fn drop(&mut self) {
        let Some(orig) = self.original.clone() else {
            return;
        };
        let dev = Path::new(PCI_DEVICES).join(&self.pci);
        if !dev.exists() {
            return; // removed meanwhile
        }
        let r = (|| -> Result<(), BindError> {
            write(dev.join("driver_override"), "\n")?;
            if current_driver(&self.pci).as_deref() == Some("vfio-pci") {
                write(dev.join("driver/unbind"), &self.pci)?;
            }
            write(
                PathBuf::from(format!("/sys/bus/pci/drivers/{orig}/bind")),
                &self.pci,
            )
        })();
        match r {
            Ok(()) => tracing::info!(pci = %self.pci, driver = %orig, "given back to its driver"),
            Err(e) => {
                tracing::warn!(pci = %self.pci, driver = %orig, error = %e, "could not restore the original driver")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_normalised_or_refused() {
        assert_eq!(
            parse_pci_address("01:00.0").as_deref(),
            Some("0000:01:00.0")
        );
        assert_eq!(
            parse_pci_address("0000:0A:1f.7").as_deref(),
            Some("0000:0a:1f.7")
        );
        for bad in [
            "",
            "DOSDNVME0",
            "01:00",
            "0000:01:00.8",
            "00:01:00.0",
            "zz:00.0",
            "0000:01:00.0.1",
        ] {
            assert_eq!(parse_pci_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn unknown_targets_are_clear_errors() {
        let e = resolve("no-such-serial-xyz")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("no NVMe controller matches") || e.is_empty(),
            "{e}"
        );
        assert!(matches!(
            resolve("ffff:ff:1f.7"),
            Err(BindError::NotFound(_))
        ));
    }
}
