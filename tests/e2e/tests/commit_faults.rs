//! Every file-system effect of a renewal, failed in turn and cut after in turn
//! (issue 15's method, after SQLite's I/O-error tests): the agent runs in this
//! process against dps-sim over TLS, with the real file or TPM (swtpm) key
//! backend, and `dps_agent::fsutil::fault` numbers every create, chmod, write,
//! fsync, rename, directory fsync, remove and mkdir under the gateway's
//! directory. For each N from 1 to the number of effects of one open +
//! renewal: (a) effect N fails with ENOSPC, (b) effects after N never happen,
//! as after a power cut. After each case the state directory is opened as a
//! fresh process would and the invariant checked:
//!
//! - the committed identity's key opens, signs, and is the key of the stored leaf;
//! - `operational-chain.pem` is the chain of `identity.json`;
//! - the committed identity is the old one or the new one, whole;
//! - the next attempt succeeds and leaves exactly one operational key.

use std::fs;
use std::path::Path;

use dps_agent::chain::{certs_from_pem, spki_of};
use dps_agent::config::Config;
use dps_agent::fsutil::fault::{self, Plan};
use dps_agent::keys::{KeySettings, Keys, SignScheme};
use dps_agent::lifecycle::{Agent, Reason};
use dps_agent::store::Store;
use dps_agent_e2e::swtpm::Swtpm;
use dps_agent_e2e::*;

/// What one backend's run found.
struct Tally {
    effects: u64,
    cases: u64,
    renewed: u64,
    kept: u64,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open(config: &Config) -> Agent {
    Agent::open(config.clone()).unwrap_or_else(|e| panic!("open: {e}"))
}

/// The invariant of a state directory, as a fresh process sees it; returns
/// the committed thumbprint.
fn check_invariant(config: &Config, case: &str) -> String {
    let agent = open(config);
    let store = Store::open_read_only(&config.state.dir);
    let id = store
        .load_identity()
        .unwrap_or_else(|e| panic!("{case}: identity: {e}"))
        .unwrap_or_else(|| panic!("{case}: the identity is gone"));
    let keys = Keys::new(KeySettings::from_config(config))
        .store(config.operational.key_backend)
        .unwrap();
    let key = keys
        .open(&id.key_uri)
        .unwrap_or_else(|e| panic!("{case}: the committed identity's key: {e}"));
    let leaf = certs_from_pem(&id.chain_pem).unwrap().remove(0);
    assert_eq!(
        spki_of(&leaf).as_deref(),
        Some(key.public_key_der()),
        "{case}: the key is not the leaf's"
    );
    let scheme = key.supported_schemes()[0];
    assert!(matches!(scheme, SignScheme::Ecdsa(_)), "{case}");
    key.sign_message(scheme, b"proof")
        .unwrap_or_else(|e| panic!("{case}: sign: {e}"));
    assert_eq!(
        fs::read_to_string(store.chain_path()).unwrap_or_default(),
        id.chain_pem,
        "{case}: operational-chain.pem is not rewritten at open"
    );
    drop(agent);
    id.thumbprint
}

/// Operational keys in the backend.
fn op_keys(config: &Config) -> Vec<String> {
    Keys::new(KeySettings::from_config(config))
        .store(config.operational.key_backend)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|u| u.to_string())
        .filter(|u| u.contains("/op-"))
        .collect()
}

fn renew(rt: &tokio::runtime::Runtime, agent: &Agent) -> Result<String, String> {
    rt.block_on(agent.attempt(Reason::Requested))
        .map(|id| id.thumbprint)
        .map_err(|e| e.to_string())
}

/// Provisions, counts the effects of one open + renewal, then runs every case.
fn every_effect_of_a_renewal(root: &Path, config_text: &str) -> Tally {
    let cfg_path = root.join("config.toml");
    fs::write(&cfg_path, config_text).unwrap();
    let config = Config::load(&cfg_path).unwrap_or_else(|e| panic!("config: {e}"));
    let rt = runtime();
    {
        let agent = open(&config);
        renew(&rt, &agent).unwrap_or_else(|e| panic!("provisioning: {e}"));
    }
    let installed = fault::install(root, Plan::Count);
    {
        let agent = open(&config);
        renew(&rt, &agent).unwrap_or_else(|e| panic!("counted renewal: {e}"));
    }
    let effects = installed.effects();
    let n = effects.len() as u64;
    assert!(n > 20, "too few effects counted: {effects:?}");
    let mut tally = Tally {
        effects: n,
        cases: 0,
        renewed: 0,
        kept: 0,
    };
    for k in 1..=n {
        for plan in [Plan::FailAt(k), Plan::CutAfter(k)] {
            let case = format!(
                "{plan:?} ({:?} {})",
                effects[k as usize - 1].0,
                effects[k as usize - 1].1.display()
            );
            installed.set(Plan::Count);
            let before = check_invariant(&config, &case);
            installed.set(plan);
            // Opening may itself fail (its lock file, its record): that is a
            // refused start, which must leave the state as it was.
            let outcome = match Agent::open(config.clone()) {
                Ok(agent) => renew(&rt, &agent).map(|_| ()),
                Err(e) => Err(e.to_string()),
            };
            installed.set(Plan::Count);
            let after = check_invariant(&config, &case);
            match (&outcome, after == before) {
                (Ok(()), true) => panic!("{case}: the renewal succeeded but nothing changed"),
                (_, false) => tally.renewed += 1,
                (Err(_), true) => tally.kept += 1,
            }
            // The next attempt succeeds and leaves one key.
            let agent = open(&config);
            let next = renew(&rt, &agent).unwrap_or_else(|e| panic!("{case}: next attempt: {e}"));
            drop(agent);
            assert_eq!(check_invariant(&config, &case), next, "{case}");
            let keys = op_keys(&config);
            assert_eq!(keys.len(), 1, "{case}: operational keys left: {keys:?}");
            tally.cases += 1;
        }
    }
    drop(installed);
    tally
}

fn report(backend: &str, t: &Tally) {
    println!(
        "{backend} backend: {} effects in one open + renewal, {} cases (fail-at-N and cut-after-N for every N): {} committed the new identity, {} kept the old one; invariant held in all",
        t.effects, t.cases, t.renewed, t.kept
    );
    assert_eq!(t.cases, 2 * t.effects);
    assert!(t.renewed > 0 && t.kept > 0, "both outcomes must occur");
}

#[test]
fn file_backend_every_effect_of_a_renewal_fails_and_is_cut_in_turn() {
    let d = TestDir::new("commit-faults-file");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            polls_before_assign: Some(0),
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let gw = d.join("gw");
    fs::create_dir_all(&gw).unwrap();
    let setup = AgentSetup::for_sim(&gw, &sim);
    let t = every_effect_of_a_renewal(&gw, &setup.toml());
    report("file", &t);
}

#[test]
fn tpm_backend_every_effect_of_a_renewal_fails_and_is_cut_in_turn() {
    let d = TestDir::new("commit-faults-tpm");
    let pki = Pki::generate(&d.join("pki"));
    let sim = Sim::start(
        &d.join("sim"),
        &pki,
        &SimOptions {
            polls_before_assign: Some(0),
            retry_after: Some(0),
            ..Default::default()
        },
    );
    let tpm = Swtpm::start(&d.join("swtpm"));
    let gw = d.join("gw");
    fs::create_dir_all(&gw).unwrap();
    let mut setup = AgentSetup::for_sim(&gw, &sim);
    setup.key_backend = "tpm".into();
    setup.extra = format!("\n[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    let t = every_effect_of_a_renewal(&gw, &setup.toml());
    report("tpm", &t);
    drop(tpm);
}
