//! What can go wrong in a dead-letter command. Each variant's `Display` is the one line the
//! operator reads, so it says what happened and what is left in the queue.

use shared::ConfigError;

/// Why a dead-letter command stopped.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// A setting the command needs is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to RabbitMQ at {address}: {reason}")]
    Connect { address: String, reason: String },

    /// A queue the command works on does not exist.
    #[error(
        "queue {queue} does not exist: check {variable}, or start the worker once so it declares the topology"
    )]
    QueueMissing {
        queue: String,
        variable: &'static str,
    },

    /// The broker failed in the middle of a command. Whatever was not acknowledged is back in the
    /// dead-letter queue.
    // The cause is in the message rather than a `source`, so a printed error chain does not
    // repeat it.
    #[error("RabbitMQ failed while {action}: {error}")]
    Broker {
        action: &'static str,
        error: lapin::Error,
    },

    /// The broker did not answer in time (blocked by a memory or disk alarm, or unresponsive).
    /// Whatever was not acknowledged goes back to the dead-letter queue when the command ends.
    #[error(
        "RabbitMQ did not answer within {} s while {action} (blocked by a memory or disk alarm?); unacknowledged letters go back to the queue", .seconds
    )]
    Timeout { action: &'static str, seconds: u64 },

    /// The channel closed between a replayed copy's confirm and the dead letter's
    /// acknowledgement: the letter stays in the queue and the worker gets the event twice, which
    /// it absorbs.
    #[error(
        "the channel closed before a replayed dead letter was acknowledged; it stays in the queue (the worker ignores the duplicate)"
    )]
    AckLost,

    /// `show ID` found no dead letter with that id.
    #[error("no dead letter with id {id} in {queue}")]
    NotFound { id: String, queue: String },

    /// `replay --id …` named ids that are not in the queue; nothing was replayed.
    #[error("no dead letter with id {} in {queue}; nothing was replayed", .ids.join(", "))]
    UnknownIds { ids: Vec<String>, queue: String },

    /// `replay` without `--id`, `--type` or `--all`.
    #[error("replay needs a selector: --id ID (repeatable), --type TYPE or --all")]
    NoSelector,

    /// `replay` with more than one kind of selector.
    #[error("choose one selector: --id ID (repeatable), --type TYPE or --all")]
    ConflictingSelectors,

    /// `purge` without `--yes`.
    #[error(
        "purge deletes every dead letter in {queue} for good; nothing was deleted. Run it again with --yes to confirm"
    )]
    PurgeNotConfirmed { queue: String },

    /// A replay stopped before it was complete. The letters not replayed are still in the queue.
    #[error(
        "{failed} dead letter(s) could not be replayed and are still in {queue}: {first_reason}"
    )]
    ReplayIncomplete {
        failed: usize,
        queue: String,
        first_reason: String,
    },

    /// Writing the output failed (a closed pipe, a full disk).
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}
