//! The Kubernetes manifests agree with the binary: the lfguard.toml that k8s/base ships
//! in its ConfigMap passes the real `lfguard check-config`, also with the redis and tls
//! overlays' environments, and the pod's termination grace period outlasts lfguard's shutdown
//! grace.
//! `scripts/validate-k8s` checks the rendered manifests against the Kubernetes schemas.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::repo_file;

/// The file kustomize turns into the ConfigMap `lfguard-config` (configMapGenerator).
const BASE_TOML: &str = "k8s/base/lfguard.toml";
const DEPLOYMENT: &str = "k8s/base/deployment.yaml";
const REDIS_PATCH: &str = "k8s/overlays/redis/lfguard-patch.yaml";
const REDIS_SECRET: &str = "k8s/overlays/redis/redis-secret.yaml";
const TLS_PATCH: &str = "k8s/overlays/tls/lfguard-patch.yaml";
const TLS_CERTIFICATE: &str = "k8s/overlays/tls/certificate.yaml";
const TLS_SERVICE_PATCH: &str = "k8s/overlays/tls/service-patch.yaml";

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap_or_else(|err| panic!("{relative}: {err}"))
}

fn base_config() -> toml::Table {
    read(BASE_TOML)
        .parse()
        .unwrap_or_else(|err| panic!("{BASE_TOML}: {err}"))
}

/// Runs `lfguard check-config --config k8s/base/lfguard.toml` with `env` and nothing else from
/// the LFGUARD_* environment of the test run. The real partners_dir
/// (/var/run/secrets/linksfield) exists only in the pod, and check-config reads the secrets, so
/// LFGUARD_PARTNERS_DIR points it at a temporary directory with a placeholder partner.
fn check_config(env: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let partners = tempfile::tempdir().unwrap();
    std::fs::write(partners.path().join("P123456"), "placeholder-secret\n").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_lfguard"));
    command
        .arg("check-config")
        .arg("--config")
        .arg(repo_file(BASE_TOML));
    for (name, _) in std::env::vars() {
        if name.starts_with("LFGUARD_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.env("LFGUARD_PARTNERS_DIR", partners.path());
    let output = command.output().expect("the lfguard binary runs");
    (output, partners)
}

/// The effective configuration that check-config printed, after asserting that it succeeded.
fn effective(output: &Output) -> toml::Table {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "check-config refused {BASE_TOML} (status {:?}):\n{}{stdout}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .parse()
        .unwrap_or_else(|err| panic!("check-config printed no TOML ({err}):\n{stdout}"))
}

/// `section.key` (or a top-level `key`) of a TOML table.
fn get<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut keys = path.split('.');
    let last = keys.next_back().expect("a non-empty path");
    let table = keys.fold(table, |table, key| {
        table
            .get(key)
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("[{key}] is missing (looking for {path})"))
    });
    table
        .get(last)
        .unwrap_or_else(|| panic!("{path} is missing"))
}

fn get_str<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    get(table, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

#[test]
fn base_configmap_passes_check_config() {
    let (output, partners) = check_config(&[]);
    let config = effective(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(r#"url = "http://127.0.0.1:8081""#),
        "{stdout}"
    );
    assert_eq!(get_str(&config, "upstream.url"), "http://127.0.0.1:8081");
    assert_eq!(get_str(&config, "server.listen"), "0.0.0.0:8080");
    assert_eq!(get_str(&config, "server.admin_listen"), "0.0.0.0:9090");
    assert_eq!(get_str(&config, "replay.store"), "memory");
    assert_eq!(get_str(&config, "log.format"), "json");
    assert_eq!(
        Path::new(get_str(&config, "partners_dir")),
        partners.path(),
        "LFGUARD_PARTNERS_DIR overrides the file"
    );

    // Where the pod mounts the Secret is where the shipped file looks for it.
    let file = base_config();
    assert_eq!(
        get_str(&file, "partners_dir"),
        "/var/run/secrets/linksfield"
    );
    assert!(
        read(DEPLOYMENT).contains("mountPath: /var/run/secrets/linksfield"),
        "{DEPLOYMENT} does not mount the partner Secret at partners_dir"
    );
}

#[test]
fn redis_overlay_environment_passes_check_config() {
    let patch = read(REDIS_PATCH);
    for expected in [
        "name: LFGUARD_REPLAY__STORE",
        "value: redis",
        "name: LFGUARD_REPLAY__REDIS_URL",
        "name: LFGUARD_DELIVERY__STORE",
    ] {
        assert!(patch.contains(expected), "{REDIS_PATCH} lacks `{expected}`");
    }
    let url = read(REDIS_SECRET)
        .lines()
        .find_map(|line| line.trim().strip_prefix("url:"))
        .map(|url| url.trim().to_string())
        .unwrap_or_else(|| panic!("{REDIS_SECRET} has no `url:`"));

    let (output, _partners) = check_config(&[
        ("LFGUARD_REPLAY__STORE", "redis"),
        ("LFGUARD_REPLAY__REDIS_URL", &url),
        ("LFGUARD_DELIVERY__STORE", "redis"),
        ("LFGUARD_DELIVERY__MODE", "spool"),
    ]);
    let config = effective(&output);
    assert_eq!(get_str(&config, "replay.store"), "redis");
    assert_eq!(get_str(&config, "delivery.store"), "redis");
    assert_eq!(get_str(&config, "replay.redis_url"), url);
}

#[test]
fn termination_grace_period_exceeds_drain_delay_and_shutdown_grace() {
    let file = base_config();
    let duration = |key: &str| {
        humantime::parse_duration(get_str(&file, key))
            .unwrap_or_else(|err| panic!("{key} is a duration: {err}"))
    };
    let shutdown_grace = duration("server.drain_delay") + duration("server.shutdown_grace");

    let deployment = read(DEPLOYMENT);
    let periods: Vec<u64> = deployment
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("terminationGracePeriodSeconds:")
                .map(|value| {
                    value
                        .trim()
                        .parse()
                        .unwrap_or_else(|err| panic!("terminationGracePeriodSeconds: {err}"))
                })
        })
        .collect();
    assert_eq!(
        periods.len(),
        1,
        "{DEPLOYMENT}: expected one terminationGracePeriodSeconds"
    );
    let period = Duration::from_secs(periods[0]);
    assert!(
        period > shutdown_grace,
        "terminationGracePeriodSeconds ({period:?}) must exceed server.shutdown_grace \
         + drain_delay ({shutdown_grace:?}), or the kubelet kills lfguard while it drains"
    );
}

/// The value after `key:` on the first line of `text` that has it, after `after` if given.
fn yaml_value(text: &str, key: &str, after: Option<&str>) -> String {
    let start = after.map_or(0, |after| {
        text.find(after)
            .unwrap_or_else(|| panic!("no {after:?} in\n{text}"))
    });
    text[start..]
        .lines()
        .find_map(|line| line.trim().strip_prefix(key))
        .map(|value| value.trim().to_string())
        .unwrap_or_else(|| panic!("no {key:?} in\n{text}"))
}

#[test]
fn tls_overlay_serves_the_cert_manager_secret_it_mounts() {
    let patch = read(TLS_PATCH);
    let cert_file = yaml_value(
        &patch,
        "value:",
        Some("name: LFGUARD_SERVER__TLS__CERT_FILE"),
    );
    let key_file = yaml_value(
        &patch,
        "value:",
        Some("name: LFGUARD_SERVER__TLS__KEY_FILE"),
    );
    let mount = yaml_value(&patch, "mountPath:", None);
    // cert-manager writes tls.crt and tls.key into the Secret the pod mounts as a directory.
    assert_eq!(cert_file, format!("{mount}/tls.crt"));
    assert_eq!(key_file, format!("{mount}/tls.key"));
    assert!(
        !mount.starts_with("/etc/lfguard"),
        "inside the ConfigMap's mount"
    );
    let certificate = read(TLS_CERTIFICATE);
    assert_eq!(yaml_value(&certificate, "kind:", None), "Certificate");
    assert_eq!(
        yaml_value(&certificate, "secretName:", None),
        yaml_value(&patch, "secretName:", None),
        "the Certificate's Secret is the one mounted"
    );
    let service = read(TLS_SERVICE_PATCH);
    assert_eq!(yaml_value(&service, "port:", None), "443");
    assert_eq!(yaml_value(&service, "targetPort:", None), "8080");

    // The overlay's environment, with a certificate made here where the pod has cert-manager's.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["webhooks.example.com".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (crt, pem) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pem, key.serialize_pem()).unwrap();
    let (output, _partners) = check_config(&[
        ("LFGUARD_SERVER__TLS__CERT_FILE", crt.to_str().unwrap()),
        ("LFGUARD_SERVER__TLS__KEY_FILE", pem.to_str().unwrap()),
    ]);
    let config = effective(&output);
    assert_eq!(
        get_str(&config, "server.tls.cert_file"),
        crt.to_str().unwrap()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("# server.tls.cert_file: "), "{stdout}");
}

/// The spool setting commented in the base's lfguard.toml works as the comment says: uncommented
/// (here through the environment), check-config accepts it, and it lies on the emptyDir that
/// the Deployment mounts for it (the root filesystem is read-only).
#[test]
fn the_commented_spool_setting_points_at_the_mounted_empty_dir() {
    let file = read(BASE_TOML);
    let spool_dir = file
        .lines()
        .find_map(|line| line.strip_prefix("# spool_dir = "))
        .map(|value| value.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("{BASE_TOML} has no commented spool_dir"));
    assert_eq!(
        get_str(&base_config(), "delivery.mode"),
        "forward",
        "the base forwards until the operator opts in"
    );
    let (output, _partners) = check_config(&[
        ("LFGUARD_DELIVERY__MODE", "spool"),
        ("LFGUARD_DELIVERY__SPOOL_DIR", &spool_dir),
    ]);
    let config = effective(&output);
    assert_eq!(get_str(&config, "delivery.mode"), "spool");

    let deployment = read(DEPLOYMENT);
    let mount = deployment
        .lines()
        .skip_while(|line| !line.contains("- name: lfguard-spool"))
        .find_map(|line| line.trim().strip_prefix("mountPath:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{DEPLOYMENT} does not mount lfguard-spool"));
    assert!(
        spool_dir.starts_with(&format!("{mount}/")),
        "{spool_dir} is not under the mount {mount}"
    );
    let volume = deployment
        .split("volumes:")
        .nth(1)
        .expect("the pod's volumes");
    let spool_volume = volume
        .split("- name: ")
        .find(|entry| entry.starts_with("lfguard-spool"))
        .expect("the lfguard-spool volume");
    assert!(spool_volume.contains("emptyDir:"), "{spool_volume}");
}
