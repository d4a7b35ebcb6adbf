//! Static group membership across members (`state.scope: partition`, `kafka.instance_id`):
//! three instances share a group; one is SIGKILLed and restarted within its session timeout.
//! It must get exactly its partitions back, the other two must see no revocation, and the
//! output must equal the model.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use integration_tests::metrics::RECORDS_LATE;
use integration_tests::model::expected_windows;
use integration_tests::verify::{check_output, contains_all, output_problems};
use integration_tests::workload::{self, Record, StreamShape, START_TS};
use integration_tests::{poll_until, test_seed, unique_name, Broker, OutputReader, Producer};
use integration_tests::{Service, ServiceConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: usize = 6;
/// Far longer than a restart takes: the restarted member is back within its session.
const SESSION_MS: u64 = 30_000;
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// What the log says on every revocation (src/source).
const REVOKED: &str = "partitions revoked";

type Assignment = BTreeSet<(String, i64)>;

#[test]
fn a_static_member_restarted_within_its_session_gets_exactly_its_partitions_back() {
    let seed = test_seed("static_membership");
    if let Err(err) = run(seed) {
        panic!("{err:#}\n(seed {seed})");
    }
}

/// The partitions an instance holds now (`GET /api/partitions`).
fn assignment(service: &Service) -> Result<Assignment> {
    let page = service.get_json("/api/partitions")?;
    let list = page
        .as_array()
        .ok_or_else(|| anyhow!("/api/partitions is no list: {page}"))?;
    Ok(list
        .iter()
        .filter_map(|p| Some((p["topic"].as_str()?.to_owned(), p["partition"].as_i64()?)))
        .collect())
}

fn revocations(service: &Service) -> usize {
    service.log_since_start().matches(REVOKED).count()
}

fn run(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let broker = Broker::shared()?;
    let input = unique_name("static-in");
    let output = unique_name("static-out");
    let changelog = unique_name("static-changelog");
    broker.create_topic(&input, PARTITIONS as i32)?;
    broker.create_topic(&output, 2)?;
    broker.create_topic(&changelog, PARTITIONS as i32)?;
    let mut base = ServiceConfig::new(broker, &input, &output).partition_scoped(&changelog);
    base.kafka_options
        .insert("session.timeout.ms".into(), SESSION_MS.to_string());
    let windows = base.windows.clone();

    // keys live on one partition each, so partition-scoped windows are the model's windows
    let events = workload::partition_local(workload::generate(
        &mut rng,
        StreamShape {
            partitions: PARTITIONS,
            records_per_partition: 900,
            keys: 4,
            start_ts: START_TS,
        },
    ));
    let sentinel_ts = workload::max_ts(&events) + 3_600_000;
    let expected = expected_windows(
        &windows,
        &events.iter().flatten().cloned().collect::<Vec<_>>(),
    );
    let records = workload::with_local_sentinels(&events, sentinel_ts);

    let mut services = Vec::new();
    for name in ["static_a", "static_b", "static_c"] {
        let mut cfg = base.clone();
        cfg.instance_id = Some(unique_name(name));
        services.push(Service::new(name, cfg)?);
    }
    for s in services.iter_mut() {
        s.start()?;
    }
    for s in services.iter_mut() {
        s.wait_ready(READY_TIMEOUT)?;
    }
    // the group settles: every partition held by exactly one member, each member holding some
    let before: Vec<Assignment> = poll_until(
        "every partition assigned to exactly one of three members",
        READY_TIMEOUT,
        Duration::from_millis(300),
        || {
            let sets = services
                .iter()
                .map(assignment)
                .collect::<Result<Vec<_>>>()?;
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            let union: Assignment = sets.iter().flatten().cloned().collect();
            let settled = total == PARTITIONS
                && union.len() == PARTITIONS
                && sets.iter().all(|s| !s.is_empty());
            Ok(settled.then_some(sets))
        },
    )?;
    // settled for a moment: no rebalance still on its way
    std::thread::sleep(Duration::from_secs(2));
    for (s, want) in services.iter().zip(&before) {
        ensure!(assignment(s)? == *want, "assignment moved after settling");
    }
    eprintln!("[static_membership] assignments: {before:?}");

    let mut reader = OutputReader::new(broker, &output)?;
    let mut producer = Producer::new(broker)?;
    let (first, rest): (Vec<Vec<Record>>, Vec<Vec<Record>>) = records
        .iter()
        .map(|r| {
            let (a, b) = r.split_at(r.len() / 2);
            (a.to_vec(), b.to_vec())
        })
        .unzip();
    producer.send_partitions(&input, &first)?;
    let revoked_before: Vec<usize> = services.iter().map(revocations).collect();

    // SIGKILL b and start it again at once, well within its session
    let b = &mut services[1];
    b.sigkill()?;
    let restarted = Instant::now();
    b.start()?;
    b.wait_ready(READY_TIMEOUT)?;
    let back = poll_until(
        "the restarted member holding partitions again",
        READY_TIMEOUT,
        Duration::from_millis(200),
        || {
            let set = assignment(&services[1])?;
            Ok((!set.is_empty()).then_some(set))
        },
    )?;
    let took = restarted.elapsed();
    eprintln!("[static_membership] b back with {back:?} after {took:?}");
    ensure!(
        back == before[1],
        "the restarted member got {back:?}, it held {:?}",
        before[1]
    );
    ensure!(
        took < Duration::from_millis(SESSION_MS),
        "the restarted member waited {took:?}, past its session ({SESSION_MS} ms)"
    );

    producer.send_partitions_paced(&input, &rest, 50, Duration::from_millis(100))?;
    let complete = reader.poll_until(COMPLETE_TIMEOUT, |m| contains_all(&expected, m));
    for (i, s) in services.iter().enumerate() {
        ensure!(
            assignment(s)? == before[i],
            "member {i} holds {:?} after the restart, held {:?}",
            assignment(s)?,
            before[i]
        );
    }
    for i in [0, 2] {
        let now = revocations(&services[i]);
        ensure!(
            now == revoked_before[i],
            "member {i} saw {} revocations while the other member restarted:\n{}",
            now - revoked_before[i],
            services[i].log_tail(30)
        );
    }
    ensure!(
        complete,
        "output incomplete: {}",
        output_problems(&expected, reader.messages())
    );
    for s in services.iter_mut() {
        let metrics = s.scrape()?;
        ensure!(
            metrics.sum(RECORDS_LATE).unwrap_or(0.0) == 0.0,
            "late records:\n{}",
            metrics.text()
        );
        s.stop_cleanly(STOP_TIMEOUT)?;
    }
    reader.drain(Duration::from_secs(1), Duration::from_secs(15));
    // identical re-sends after the kill are allowed; a different value is not
    let summary = check_output(&expected, reader.messages())?;
    eprintln!(
        "[static_membership] {} windows exact, {} identical re-sends",
        summary.windows, summary.duplicates
    );
    Ok(())
}
