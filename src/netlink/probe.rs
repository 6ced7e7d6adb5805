//! Kernel capability probing for the tc modules some kernels lack (matchall, fw, gact, connmark,
//! tbf, fq_codel).
//! It only reads what the kernel exposes (`/proc/config.gz`, `/sys/module`, `modules.builtin`,
//! the module tree) and changes nothing. The kernel's own answer at execute time confirms it:
//! see [`missing_feature`].

use std::io::Read;
use std::path::Path;

use super::error::{KernelError, NetlinkError};

/// A tc feature that may be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    Matchall,
    Fw,
    Gact,
    Connmark,
    /// The u32 classifier's skb mark match (`CONFIG_CLS_U32_MARK`, part of cls_u32). Without it the
    /// kernel silently ignores a u32 mark key.
    U32Mark,
    /// The TBF qdisc (`sch_tbf`), the leaf under each class where fq_codel is missing.
    Tbf,
    /// The fq_codel qdisc (`sch_fq_codel`), the leaf under each class where present.
    FqCodel,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::Matchall,
        Feature::Fw,
        Feature::Gact,
        Feature::Connmark,
        Feature::U32Mark,
        Feature::Tbf,
        Feature::FqCodel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Matchall => "matchall",
            Feature::Fw => "fw",
            Feature::Gact => "gact",
            Feature::Connmark => "connmark",
            Feature::U32Mark => "u32 mark match",
            Feature::Tbf => "tbf",
            Feature::FqCodel => "fq_codel",
        }
    }

    fn config(self) -> &'static str {
        match self {
            Feature::Matchall => "CONFIG_NET_CLS_MATCHALL",
            Feature::Fw => "CONFIG_NET_CLS_FW",
            Feature::Gact => "CONFIG_NET_ACT_GACT",
            Feature::Connmark => "CONFIG_NET_ACT_CONNMARK",
            Feature::U32Mark => "CONFIG_CLS_U32_MARK",
            Feature::Tbf => "CONFIG_NET_SCH_TBF",
            Feature::FqCodel => "CONFIG_NET_SCH_FQ_CODEL",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Feature::Matchall => "cls_matchall",
            Feature::Fw => "cls_fw",
            Feature::Gact => "act_gact",
            Feature::Connmark => "act_connmark",
            Feature::U32Mark => "cls_u32",
            Feature::Tbf => "sch_tbf",
            Feature::FqCodel => "sch_fq_codel",
        }
    }
}

/// What the probe found for one feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Built in or loaded, with the evidence.
    Present(String),
    /// A module exists on disk; the kernel loads it on first use.
    Loadable(String),
    Absent(String),
    /// Nothing the kernel exposes says either way.
    Unknown,
}

impl Availability {
    /// Whether raylimit should plan with this feature (a loadable module counts).
    pub fn usable(&self) -> bool {
        matches!(
            self,
            Availability::Present(_) | Availability::Loadable(_) | Availability::Unknown
        )
    }

    /// Whether something the kernel exposes says the feature is there. What raylimit adds on
    /// its own (a leaf queue) needs this: where nothing tells, as on a kernel without
    /// `/proc/config.gz` whose module is not installed, using it would fail every limit.
    pub fn confirmed(&self) -> bool {
        matches!(self, Availability::Present(_) | Availability::Loadable(_))
    }
}

/// Where the probe looks; tests point it at a fake tree.
#[derive(Debug, Clone)]
pub struct ProbeRoots {
    pub proc_config: String,
    pub sys_module: String,
    pub lib_modules: String,
}

impl Default for ProbeRoots {
    fn default() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        ProbeRoots {
            proc_config: "/proc/config.gz".into(),
            sys_module: "/sys/module".into(),
            lib_modules: format!("/lib/modules/{}", release.trim()),
        }
    }
}

/// The kernel's view of the four optional tc features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub features: Vec<(Feature, Availability)>,
}

impl Capabilities {
    pub fn probe() -> Self {
        Self::probe_at(&ProbeRoots::default())
    }

    pub fn probe_at(roots: &ProbeRoots) -> Self {
        let config = read_config(&roots.proc_config);
        let builtin = std::fs::read_to_string(format!("{}/modules.builtin", roots.lib_modules))
            .unwrap_or_default();
        let features = Feature::ALL
            .iter()
            .map(|&f| (f, availability(f, roots, config.as_deref(), &builtin)))
            .collect();
        Capabilities { features }
    }

    pub fn get(&self, feature: Feature) -> &Availability {
        self.features
            .iter()
            .find(|(f, _)| *f == feature)
            .map(|(_, a)| a)
            .unwrap_or(&Availability::Unknown)
    }

    pub fn has(&self, feature: Feature) -> bool {
        self.get(feature).usable()
    }
}

/// Whether `feature`'s module is loaded, built in (`modules.builtin`) or installed, read
/// without the kernel configuration (a few file checks, where the full probe decompresses
/// `/proc/config.gz`): what a run that may change nothing can afford. A feature only the
/// configuration names as built in reads as missing here.
pub fn module_confirmed(feature: Feature, roots: &ProbeRoots) -> bool {
    let builtin = std::fs::read_to_string(format!("{}/modules.builtin", roots.lib_modules))
        .unwrap_or_default();
    availability(feature, roots, None, &builtin).confirmed()
}

fn read_config(path: &str) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

fn availability(
    f: Feature,
    roots: &ProbeRoots,
    config: Option<&str>,
    builtin: &str,
) -> Availability {
    if f == Feature::U32Mark {
        // A build option of cls_u32, not a module of its own: only the configuration tells.
        return match config.map(|c| config_value(c, f.config())) {
            Some(Some("y")) => Availability::Present(format!("{}=y", f.config())),
            Some(_) => Availability::Absent(format!("{} is not set", f.config())),
            None => Availability::Unknown,
        };
    }
    if Path::new(&roots.sys_module).join(f.module()).exists() {
        return Availability::Present(format!("{}/{} exists", roots.sys_module, f.module()));
    }
    if builtin
        .lines()
        .any(|l| l.rsplit('/').next().map(|n| n.trim_end_matches(".ko")) == Some(f.module()))
    {
        return Availability::Present(format!("{} is in modules.builtin", f.module()));
    }
    if let Some(path) = find_module(&roots.lib_modules, f.module()) {
        return Availability::Loadable(format!("module {path}"));
    }
    match config.and_then(|c| config_value(c, f.config())) {
        Some("y") => Availability::Present(format!("{}=y", f.config())),
        Some("m") => Availability::Absent(format!(
            "{}=m but no {} module is installed",
            f.config(),
            f.module()
        )),
        Some(_) | None if config.is_some() => {
            Availability::Absent(format!("{} is not set", f.config()))
        }
        _ => Availability::Unknown,
    }
}

fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Looks for `kernel/net/sched/MODULE.ko[.xz|.zst|.gz]` under the module tree.
fn find_module(lib_modules: &str, module: &str) -> Option<String> {
    ["", ".xz", ".zst", ".gz"]
        .iter()
        .map(|ext| format!("{lib_modules}/kernel/net/sched/{module}.ko{ext}"))
        .find(|p| Path::new(p).exists())
}

/// Turns the kernel's refusal of a request that used `feature` into a named missing feature, when
/// that is what the refusal means ("TC classifier not found", "Failed to load TC action module").
pub fn missing_feature(feature: Feature, error: &KernelError) -> Option<NetlinkError> {
    let text = error.message.as_deref().unwrap_or("");
    let refused = error.errno == libc::ENOENT
        && (text.contains("classifier not found")
            || text.contains("action module")
            || text.is_empty());
    refused.then(|| NetlinkError::MissingFeature {
        feature: feature.name(),
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_evidence_confirms_a_feature() {
        assert!(Availability::Present("x".into()).confirmed());
        assert!(Availability::Loadable("x".into()).confirmed());
        assert!(!Availability::Unknown.confirmed());
        assert!(Availability::Unknown.usable());
        assert!(!Availability::Absent("x".into()).confirmed());
    }

    #[test]
    fn the_module_checks_confirm_a_builtin_or_installed_module_without_the_configuration() {
        let dir = std::env::temp_dir().join(format!("raylimit-probe-{}", std::process::id()));
        let lib = dir.join("lib");
        std::fs::create_dir_all(lib.join("kernel/net/sched")).unwrap();
        let roots = ProbeRoots {
            // Never read here: a configuration that says `=y` would confirm it, this one cannot.
            proc_config: dir.join("no-config.gz").display().to_string(),
            sys_module: dir.join("sys").display().to_string(),
            lib_modules: lib.display().to_string(),
        };
        assert!(!module_confirmed(Feature::FqCodel, &roots));
        std::fs::write(
            lib.join("modules.builtin"),
            "kernel/net/sched/sch_fq_codel.ko\n",
        )
        .unwrap();
        assert!(module_confirmed(Feature::FqCodel, &roots));
        assert!(!module_confirmed(Feature::Tbf, &roots));
        std::fs::write(lib.join("kernel/net/sched/sch_tbf.ko.xz"), "").unwrap();
        assert!(module_confirmed(Feature::Tbf, &roots));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_lines_are_read_exactly() {
        let c =
            "CONFIG_NET_CLS_FW=m\n# CONFIG_NET_CLS_MATCHALL is not set\nCONFIG_NET_ACT_GACT=y\n";
        assert_eq!(config_value(c, "CONFIG_NET_CLS_FW"), Some("m"));
        assert_eq!(config_value(c, "CONFIG_NET_CLS_MATCHALL"), None);
        assert_eq!(config_value(c, "CONFIG_NET_ACT_GACT"), Some("y"));
    }
}
