//! The Linux GPIO character device (uAPI v2) through `gpiocdev`: line by name or offset,
//! bias, edge, a larger kernel event buffer, kernel timestamps (`CLOCK_MONOTONIC`), lost
//! edges from sequence-number gaps.
//!
//! No kernel debounce is requested. The Pi's GPIO controller (like gpio-sim) has no hardware
//! debounce, so the kernel would emulate it in gpiolib-cdev: a delayed work item per edge,
//! rounded up to whole jiffies (4-10 ms), that stamps the event when the work runs instead of
//! when the edge happened. That costs the timestamps their precision (the power figure), hides
//! contact bounce from `powermeter_pulses_rejected_total`, and swallows edges of a line that
//! toggles faster than the rounded period. The counting debounce on the kernel's edge stamps
//! (`debounce_ms`) does the job without those costs.
//!
//! Events are read in batches into a buffer of whole events and every one is decoded.
//! `gpiocdev` 0.8's `read_edge_event` must not be used: with only the `uapi_v2` feature it
//! reads into a buffer of `size_of::<LineEdgeEvent>()` *u64s* (eight events), decodes the
//! first and drops the rest, which showed up as "lost" edges whenever two were queued (a
//! bouncing contact, a pulse during a busy moment). Its async wrapper also leaves the fd's
//! readiness set after a caller drains the queue, so the next wait spins on the runtime.

use gpiocdev::line::{Bias as LineBias, EdgeDetection};
use gpiocdev::tokio::AsyncRequest;

use super::{EdgeEvent, InputError, PulseSource, SeqTracker};
use crate::config::{Bias, Edge, InputConfig};

/// Kernel event buffer, in edges: room for bursts while the daemon is busy.
const KERNEL_BUFFER: u32 = 256;

/// Edges taken from the kernel per read.
const READ_BATCH: usize = 16;

/// An armed GPIO line.
pub struct GpioSource {
    request: AsyncRequest,
    seq: SeqTracker,
    description: String,
    /// Raw events as read from the kernel (`READ_BATCH` whole events).
    buf: Vec<u64>,
}

impl GpioSource {
    /// Requests the line named `GPIO<pin>` on any chip, or offset `pin` of `cfg.chip`.
    pub fn open(cfg: &InputConfig) -> Result<Self, InputError> {
        let name = format!("GPIO{}", cfg.pin);
        let mut builder = gpiocdev::Request::builder();
        let description = match gpiocdev::find_named_line(&name) {
            Some(found) => {
                let d = format!(
                    "{name} ({} line {})",
                    found.chip.display(),
                    found.info.offset
                );
                builder.with_found_line(&found);
                d
            }
            None => {
                builder.on_chip(&cfg.chip).with_line(cfg.pin);
                format!(
                    "{} line {} (no line named {name})",
                    cfg.chip.display(),
                    cfg.pin
                )
            }
        };
        builder
            .with_consumer("powermeterd")
            .as_input()
            .with_edge_detection(match cfg.edge {
                Edge::Rising => EdgeDetection::RisingEdge,
                Edge::Falling => EdgeDetection::FallingEdge,
            })
            .with_bias(match cfg.bias {
                Bias::Off => LineBias::Disabled,
                Bias::PullDown => LineBias::PullDown,
                Bias::PullUp => LineBias::PullUp,
            })
            .with_kernel_event_buffer_size(KERNEL_BUFFER);
        let request = builder.request().map_err(|e| InputError {
            what: format!("requesting {description}"),
            detail: e.to_string(),
        })?;
        let buf = vec![0; request.edge_event_u64_size() * READ_BATCH];
        Ok(Self {
            request: AsyncRequest::new(request),
            seq: SeqTracker::default(),
            description,
            buf,
        })
    }
}

impl PulseSource for GpioSource {
    async fn next_edges(&mut self, out: &mut Vec<EdgeEvent>) -> Result<(), InputError> {
        let err = |e: gpiocdev::Error| InputError {
            what: format!("reading edge events of {}", self.description),
            detail: e.to_string(),
        };
        // waits for readiness, reads what is queued (up to READ_BATCH events) and clears the
        // readiness once the queue is empty: cancel-safe, nothing is read before it returns
        let words = self
            .request
            .read_edge_events_into_slice(&mut self.buf)
            .await
            .map_err(err)?;
        let req = self.request.as_ref();
        let size = req.edge_event_u64_size();
        for raw in self.buf[..words].chunks_exact(size) {
            let ev = req.edge_event_from_slice(raw).map_err(err)?;
            out.push(EdgeEvent {
                timestamp_ns: ev.timestamp_ns,
                lost_before: self.seq.next(ev.line_seqno),
            });
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
