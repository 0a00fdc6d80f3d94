//! The operator's commands: `ferrocorn status`, `reload` and `scale` over the control socket,
//! and the answers owed to a client that waits for its reload to complete. [`crate::control`]
//! is the socket and its line protocol; this module decides what each request does and says.
//!
//! [`Master::reload`] lives here although HUP calls it too: it is the one reload command, by
//! signal or by socket, and its `Err` is written for the operator (the socket client gets it
//! verbatim; HUP finds it in the log).

use super::{Master, Succession, timing};
use crate::config::{Config, ProcessEnv};
use crate::control::{self, Request};
use crate::pool::{Event, Phase};

impl Master {
    /// Serve the control socket's waiting commands.
    pub(super) fn handle_control(&mut self) {
        if !self.answers_control() {
            return;
        }
        let Some(control) = &self.control else { return };
        for (stream, request) in control.accept_all() {
            match request {
                Err(e) => control::finish(&stream, &format!("error: {e}")),
                Ok(Request::Status) => control::finish(&stream, &self.status_text()),
                Ok(Request::Reload) => match self.reload() {
                    Ok(()) => {
                        control::answer(
                            &stream,
                            &format!(
                                "reload accepted: rolling to generation {}",
                                self.pool.generation()
                            ),
                        );
                        self.reload_waiters.push(stream);
                    }
                    Err(e) => control::finish(&stream, &format!("error: {e}")),
                },
                Ok(Request::Scale(n)) => {
                    let from = self.pool.desired();
                    control::finish(&stream, &format!("scaling from {from} to {n} workers"));
                    let event = if n > from { Event::Grow } else { Event::Shrink };
                    for _ in 0..n.abs_diff(from) {
                        self.dispatch(event.clone());
                    }
                }
            }
        }
    }

    /// Whether this master answers the control socket: not while a new master it started
    /// shares it (that one answers).
    pub(super) fn answers_control(&self) -> bool {
        !matches!(self.succession, Succession::Upgrading(_))
    }

    /// Tell the clients of a reload that it is complete, once it is.
    pub(super) fn answer_reload_waiters(&mut self) {
        if self.reload_waiters.is_empty() || self.pool.reloading() {
            return;
        }
        let text = format!(
            "reload complete: {}/{} workers ready, generation {}",
            self.pool.serving(),
            self.pool.desired(),
            self.pool.generation()
        );
        for stream in self.reload_waiters.drain(..) {
            control::finish(&stream, &text);
        }
    }

    /// The workers, a line each, for `ferrocorn status`.
    fn status_text(&self) -> String {
        let rows: Vec<String> = ferrocorn_worker::status::workers(self.scoreboard)
            .iter()
            .map(|w| {
                format!(
                    "{:>4} {:>8} {:<9} {:>7.0} {:>8} {:>9} {:>7} {:>10}",
                    w.slot,
                    w.pid,
                    w.state,
                    w.age_seconds,
                    w.requests,
                    w.in_flight,
                    w.rss_bytes >> 20,
                    w.generation
                )
            })
            .collect();
        let mut text = format!(
            "{}/{} workers ready, generation {}{}\n{:>4} {:>8} {:<9} {:>7} {:>8} {:>9} {:>7} {:>10}\n",
            self.pool.serving(),
            self.pool.desired(),
            self.pool.generation(),
            if self.pool.reloading() {
                ", reloading"
            } else {
                ""
            },
            "slot",
            "pid",
            "state",
            "age_s",
            "requests",
            "in_flight",
            "rss_mib",
            "generation"
        );
        for line in rows {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    /// Re-read the configuration and roll the pool to it; `Err` says why it is refused (the
    /// running pool then is unchanged).
    pub(super) fn reload(&mut self) -> Result<(), String> {
        if matches!(self.pool.phase(), Phase::Stopping | Phase::Exited) {
            return Err("the pool is stopping".to_owned());
        }
        // A key that needs the sockets or the logger re-created keeps its running value.
        let loaded = self.cli.load(&ProcessEnv).map_err(|e| e.to_string());
        let (mut raw, kept) = match loaded {
            Ok((mut raw, _)) => {
                let kept = raw.keep_restart_only(&self.raw);
                (raw, kept)
            }
            Err(e) => {
                tracing::error!(error = %e, "reload: invalid configuration; the running pool is unchanged");
                return Err(format!(
                    "reload refused: {e}; the running pool is unchanged"
                ));
            }
        };
        let new = match Config::resolve(&raw) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "reload: invalid configuration; the running pool is unchanged");
                return Err(format!(
                    "reload refused: {e}; the running pool is unchanged"
                ));
            }
        };
        if !kept.is_empty() {
            tracing::warn!(keys = ?kept, "reload: these keys take effect only after a restart; keeping their running values");
        }
        std::mem::swap(&mut self.raw, &mut raw);
        self.config = new;
        self.dispatch(Event::Reload {
            workers: self.config.workers,
            timing: timing(&self.config),
        });
        Ok(())
    }
}
