//! The `rppal` backend (cargo feature `rppal`), kept thin: rppal is unmaintained since
//! 2025-07, the `gpio` backend is the default. rppal delivers interrupts on its own thread;
//! they are forwarded over a channel.

use std::time::Duration;

use rppal::gpio::{Event, Gpio, InputPin, Trigger};
use tokio::sync::mpsc;

use super::{EdgeEvent, InputError, PulseSource, SeqTracker};
use crate::config::{Bias, Edge, InputConfig};

/// An armed rppal input pin.
pub struct RppalSource {
    _pin: InputPin,
    rx: mpsc::UnboundedReceiver<Event>,
    seq: SeqTracker,
    pin: u8,
}

impl RppalSource {
    /// Opens BCM pin `cfg.pin` with the configured bias and edge.
    pub fn open(cfg: &InputConfig) -> Result<Self, InputError> {
        let fail = |what: &str, e: rppal::gpio::Error| InputError {
            what: format!("{what} BCM {} with rppal", cfg.pin),
            detail: e.to_string(),
        };
        let pin_no = u8::try_from(cfg.pin).map_err(|_| InputError {
            what: "rppal".into(),
            detail: format!("pin {} out of range", cfg.pin),
        })?;
        let gpio = Gpio::new().map_err(|e| fail("opening the GPIO for", e))?;
        let pin = gpio.get(pin_no).map_err(|e| fail("getting", e))?;
        let mut pin = match cfg.bias {
            Bias::Off => pin.into_input(),
            Bias::PullDown => pin.into_input_pulldown(),
            Bias::PullUp => pin.into_input_pullup(),
        };
        let trigger = match cfg.edge {
            Edge::Rising => Trigger::RisingEdge,
            Edge::Falling => Trigger::FallingEdge,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let debounce = Some(Duration::from_micros(
            (cfg.debounce_ms * 1000 / 4).min(5000),
        ))
        .filter(|d| !d.is_zero());
        pin.set_async_interrupt(trigger, debounce, move |ev| {
            let _ = tx.send(ev);
        })
        .map_err(|e| fail("arming interrupts on", e))?;
        Ok(Self {
            _pin: pin,
            rx,
            seq: SeqTracker::default(),
            pin: pin_no,
        })
    }
}

impl PulseSource for RppalSource {
    async fn next_edges(&mut self, out: &mut Vec<EdgeEvent>) -> Result<(), InputError> {
        let ev = self.rx.recv().await.ok_or_else(|| InputError {
            what: "reading rppal interrupts".into(),
            detail: "the interrupt thread stopped".into(),
        })?;
        out.push(EdgeEvent {
            timestamp_ns: ev.timestamp.as_nanos() as u64,
            lost_before: self.seq.next(ev.seqno),
        });
        while let Ok(ev) = self.rx.try_recv() {
            out.push(EdgeEvent {
                timestamp_ns: ev.timestamp.as_nanos() as u64,
                lost_before: self.seq.next(ev.seqno),
            });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("BCM {} via rppal", self.pin)
    }
}
