//! The connection loop of `powermeter-mqtt`: connect with a last will, announce the device
//! to Home Assistant, publish the daemon's reading every interval, reconnect with backoff.
//!
//! Bounded by construction: the request channel holds [`QUEUE`] messages and a message that
//! does not fit is dropped (the next state supersedes it); nothing is queued while the broker
//! is away (states are only published while connected, and a clean session drops the rest).
//! The daemon never waits on any of this: the publisher only connects to its reading socket.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::signal::unix::{SignalKind, signal};

use super::config::MqttConfig;
use super::discovery::{self, Figures, OFFLINE, ONLINE, Topics};
use super::tls;

/// Capacity of the client's request channel.
pub const QUEUE: usize = 16;
/// First and last delay between two connection attempts.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A repeated identical error is logged again after this long (with the repeat count).
const LOG_REPEAT: Duration = Duration::from_secs(600);
/// Longest reading document accepted from the daemon.
const READING_MAX: u64 = 64 * 1024;
/// How long a reading from the daemon may take.
const READING_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the publisher needs, resolved from the configuration before it connects
/// (password file, CA file, device id): a problem here is a configuration error.
pub struct Prepared {
    options: MqttOptions,
    config: MqttConfig,
    topics: Topics,
    broker: String,
}

/// Where the machine id is read when `[mqtt] device_id` is not set.
pub const MACHINE_ID: &str = "/etc/machine-id";

/// The credential name of the password in the unit (`LoadCredential=mqtt-password:...`).
pub const PASSWORD_CREDENTIAL: &str = "mqtt-password";

/// Resolves `config` into connection options. `None` when MQTT is off (no broker).
pub fn prepare(config: &MqttConfig) -> Result<Option<Prepared>> {
    let Some(broker) = config.broker.clone() else {
        return Ok(None);
    };
    let device_id = match &config.device_id {
        Some(id) => id.clone(),
        None => {
            let mid = std::fs::read_to_string(MACHINE_ID)
                .with_context(|| format!("reading {MACHINE_ID} (or set mqtt.device_id)"))?;
            if mid.trim().is_empty() {
                bail!("{MACHINE_ID} is empty (or set mqtt.device_id)");
            }
            discovery::device_id_from_machine_id(&mid)
        }
    };
    let topics = Topics::new(config, &device_id);
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("powermeter-{device_id}"));
    let mut options = MqttOptions::new(client_id, broker.clone(), config.port());
    options.set_keep_alive(Duration::from_secs(config.keep_alive_s));
    options.set_clean_session(true);
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    options.set_inflight(8);
    options.set_last_will(LastWill::new(
        &topics.availability,
        OFFLINE,
        qos(config.qos),
        true,
    ));
    if let Some(user) = &config.username {
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => read_password(file)?,
            (None, None) => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    if config.tls {
        let ca = config
            .ca_file
            .as_deref()
            .context("mqtt.tls needs mqtt.ca_file")?;
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls::client_config(ca)?),
        ));
    }
    Ok(Some(Prepared {
        options,
        config: config.clone(),
        topics,
        broker: format!("{broker}:{}", config.port()),
    }))
}

/// The password: the first line of `file`; when the publisher may not read it (a root-only
/// file on the data partition), the copy systemd passed as the credential `mqtt-password`.
fn read_password(file: &Path) -> Result<String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|d| Path::new(&d).join(PASSWORD_CREDENTIAL));
            match credential.map(std::fs::read_to_string) {
                Some(Ok(t)) => t,
                _ => {
                    return Err(e).with_context(|| {
                        format!("reading the MQTT password file {}", file.display())
                    });
                }
            }
        }
    };
    let line = text.lines().next().unwrap_or_default().to_owned();
    if line.is_empty() {
        bail!("the MQTT password file {} is empty", file.display());
    }
    Ok(line)
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Logs one line per distinct problem, and again only after [`LOG_REPEAT`] with the count of
/// repeats, so a retry storm does not flood the journal.
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, Instant, u64)>,
}

impl ErrorLog {
    fn report(&mut self, what: &str, problem: String, retry: Duration) {
        match &mut self.last {
            Some((p, at, n)) if *p == problem && at.elapsed() < LOG_REPEAT => {
                *n += 1;
                tracing::debug!(problem = %problem, retry_s = retry.as_secs(), "{what} (again)");
            }
            _ => {
                let repeats = self.last.as_ref().map_or(0, |l| l.2);
                tracing::error!(problem = %problem, retry_s = retry.as_secs(), repeats, "{what}");
                self.last = Some((problem, Instant::now(), 0));
            }
        }
    }

    fn clear(&mut self) {
        self.last = None;
    }
}

/// A human cause for a connection error, without rumqttc's type names where it matters.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!(
                "the broker refused the connection ({code:?}): check mqtt.username and the password"
            )
        }
        ConnectionError::Tls(t) => format!("TLS: {t} (check mqtt.ca_file and the broker's name)"),
        other => other.to_string(),
    }
}

/// Reads one reading from the daemon's socket.
pub async fn read_figures(socket: &Path) -> Result<Figures> {
    let fut = async {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to the daemon's {}", socket.display()))?;
        let mut buf = Vec::with_capacity(1024);
        stream
            .take(READING_MAX)
            .read_to_end(&mut buf)
            .await
            .context("reading from the daemon")?;
        serde_json::from_slice::<Figures>(&buf).context("the daemon's reading is not valid JSON")
    };
    tokio::time::timeout(READING_TIMEOUT, fut)
        .await
        .context("the daemon did not answer within 2 s")?
}

/// Runs the publisher until SIGTERM/SIGINT (then `offline` is published and it returns).
pub fn run(prepared: Prepared) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .thread_name("powermeterd-mqtt")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(prepared))
}

struct Session {
    client: AsyncClient,
    config: MqttConfig,
    topics: Topics,
    qos: QoS,
    dropped: u64,
}

impl Session {
    fn publish(&mut self, topic: &str, payload: String) {
        if let Err(e) = self.client.try_publish(topic, self.qos, true, payload) {
            self.dropped += 1;
            tracing::debug!(error = %e, topic, dropped = self.dropped, "publication dropped (queue full)");
        }
    }

    fn announce(&mut self) {
        for (topic, payload) in discovery::discovery_payloads(&self.config, &self.topics) {
            self.publish(&topic, payload);
        }
    }
}

async fn run_async(prepared: Prepared) -> Result<()> {
    let Prepared {
        options,
        config,
        topics,
        broker,
    } = prepared;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (client, mut eventloop) = AsyncClient::new(options, QUEUE);
    let mut s = Session {
        client,
        qos: qos(config.qos),
        config,
        topics,
        dropped: 0,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(s.config.publish_interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut backoff = BACKOFF_MIN;
    let mut connected = false;
    // Whether the daemon answered last time (availability follows it), and the last energy
    // published (a lower one is logged: Home Assistant would take it for a meter reset).
    let mut daemon_ok: Option<bool> = None;
    let mut last_energy: Option<f64> = None;
    let mut broker_errors = ErrorLog::default();
    let mut daemon_errors = ErrorLog::default();
    tracing::info!(broker = %broker, state = %s.topics.state, device_id = %s.topics.device_id, "MQTT publisher starting");

    loop {
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff = BACKOFF_MIN;
                    broker_errors.clear();
                    tracing::info!(broker = %broker, "connected to the MQTT broker");
                    if let Err(e) = s.client.try_subscribe(&s.topics.ha_status, s.qos) {
                        tracing::warn!(error = %e, "cannot subscribe to Home Assistant's status");
                    }
                    s.announce();
                    daemon_ok = None;
                    publish_reading(&mut s, &mut daemon_ok, &mut last_energy, &mut daemon_errors).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == s.topics.ha_status && p.payload.as_ref() == ONLINE.as_bytes() {
                        tracing::info!("Home Assistant is online: discovery published again");
                        s.announce();
                        daemon_ok = None;
                        publish_reading(&mut s, &mut daemon_ok, &mut last_energy, &mut daemon_errors).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connected = false;
                    broker_errors.report("MQTT broker unreachable or refusing; retrying", describe(&e), backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = sigterm.recv() => return Ok(()),
                        _ = sigint.recv() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            },
            _ = tick.tick() => {
                if connected {
                    publish_reading(&mut s, &mut daemon_ok, &mut last_energy, &mut daemon_errors).await;
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    // Clean stop: say offline (a clean disconnect does not fire the last will), then drive the
    // event loop until the broker has it or 2 s pass.
    if connected {
        let topic = s.topics.availability.clone();
        s.publish(&topic, OFFLINE.to_owned());
        let _ = s.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
    tracing::info!(dropped = s.dropped, "MQTT publisher stopped");
    Ok(())
}

async fn publish_reading(
    s: &mut Session,
    daemon_ok: &mut Option<bool>,
    last_energy: &mut Option<f64>,
    errors: &mut ErrorLog,
) {
    let availability = s.topics.availability.clone();
    match read_figures(&s.config.reading_socket).await {
        Ok(f) => {
            errors.clear();
            if *daemon_ok != Some(true) {
                s.publish(&availability, ONLINE.to_owned());
                *daemon_ok = Some(true);
            }
            if last_energy.is_some_and(|e| f.energy_kwh < e) {
                tracing::warn!(
                    before = last_energy.unwrap_or_default(),
                    now = f.energy_kwh,
                    "the daemon's energy register went down (set with --set-reading?): Home Assistant counts it as a meter reset"
                );
            }
            *last_energy = Some(f.energy_kwh);
            let state = s.topics.state.clone();
            s.publish(&state, discovery::state_payload(&f));
        }
        Err(e) => {
            errors.report(
                "no reading from the daemon; availability offline until it answers",
                format!("{e:#}"),
                Duration::from_secs(s.config.publish_interval_s),
            );
            if *daemon_ok != Some(false) {
                s.publish(&availability, OFFLINE.to_owned());
                *daemon_ok = Some(false);
            }
        }
    }
}
