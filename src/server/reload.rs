//! Reloading partners, secrets and modes, and the certificate files (the listener's, an https
//! upstream's): on SIGHUP, and when the config file, a secret source or a certificate file
//! changes. The configuration is re-read whole; only `SecretStore` and the TLS configurations are
//! swapped.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::server::shared::Shared;
use crate::state::secrets::SecretStore;

/// Re-reads the configuration file and every secret source, and swaps the new secrets and modes
/// in whole. A failed read keeps the last good set, logs why and counts it.
pub fn reload(shared: &Shared, trigger: &'static str) {
    apply(shared, load_current(shared), trigger);
    if let Some(tls) = &shared.listener_tls {
        tls.reload(trigger, true);
    }
    shared.upstream.reload_tls(trigger, true);
}

/// The configuration as it is now on disk and in the environment, and its secrets.
fn load_current(shared: &Shared) -> Result<(Config, SecretStore), Vec<String>> {
    let config =
        crate::config::load_for_reload(shared.config_path.as_deref()).map_err(|err| err.0)?;
    let secrets = secrets_of(&config)?;
    Ok((config, secrets))
}

fn apply(
    shared: &Shared,
    loaded: Result<(Config, SecretStore), Vec<String>>,
    trigger: &'static str,
) {
    match loaded {
        Ok((config, fresh)) => {
            if **shared.secrets.load() != fresh {
                tracing::info!(
                    trigger,
                    partners = fresh.partner_count(),
                    "secrets reloaded"
                );
                shared.secrets.store(Arc::new(fresh));
            }
            if !shared.config.same_apart_from_reloadable(&config) {
                tracing::warn!(
                    trigger,
                    "configuration changes other than partners, secrets and modes take effect at the next restart"
                );
            }
            shared.metrics.secret_reload(true);
        }
        Err(problems) => {
            tracing::error!(
                trigger,
                problems = %problems.join("; "),
                "secret reload failed; keeping the previous secrets"
            );
            shared.metrics.secret_reload(false);
        }
    }
}

/// Polls the config file and the secret files every `reload_interval`, comparing content rather
/// than mtimes: Kubernetes updates a mounted Secret or ConfigMap by swapping a symlink, which
/// leaves file mtimes alone. Only changes count as reloads, and a broken source is reported once
/// until it changes again.
pub async fn watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut last_problems: Option<Vec<String>> = None;
    let mut tick = tokio::time::interval(shared.config.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let loaded = load_current(&shared);
        let unchanged = match &loaded {
            Ok((_, fresh)) => **shared.secrets.load() == *fresh,
            Err(problems) => last_problems.as_ref() == Some(problems),
        };
        last_problems = loaded.as_ref().err().cloned();
        if !unchanged {
            apply(&shared, loaded, "file change");
        }
        if let Some(tls) = &shared.listener_tls {
            tls.reload("file change", false);
        }
        shared.upstream.reload_tls("file change", false);
    }
}

/// The secrets and per-partner overrides a configuration names.
pub fn secrets_of(config: &Config) -> Result<SecretStore, Vec<String>> {
    SecretStore::load(
        &config.partners,
        config.partners_dir.as_deref(),
        config.verify.mode,
    )
}
