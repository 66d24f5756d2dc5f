//! How long `dlq list` and `dlq replay --all` take for N dead letters, against the protocol's
//! floor measured in the same run:
//!
//! - list vs. taking N messages with a bare consumer and returning them with one `basic.nack`
//!   (AMQP 0-9-1 cannot peek, so that is the least any listing does);
//! - replay vs. publishing N copies with confirms, 64 in flight as the replay has them (the
//!   least a replay that acknowledges only confirmed copies does, before fetching and
//!   acknowledging).
//!
//! `cargo run -p dlq --example dlq-bench -- --letters 2000` (AMQP_URL or the local default). The
//! work is the broker's, so the debug build measures the same as a release build.
//! It works on queues of its own and deletes them afterwards.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::{Settings, Topology};
use test_support::broker::queue_counts;

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Copies in flight at once, as the replay does.
const WINDOW: u32 = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let letters = letters_argument()?;
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string());
    let topology = Topology::prefixed(&format!("dlq-bench-{}", uuid::Uuid::new_v4()));
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology.declare(&channel).await?;

    let result = measure(&channel, &url, &topology, letters).await;

    for queue in [&topology.queue, &topology.dead_queue] {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(
            topology.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    connection.close(200, "bench done".into()).await?;
    result
}

async fn measure(
    channel: &Channel,
    url: &str,
    topology: &Topology,
    letters: u32,
) -> anyhow::Result<()> {
    let settings = Settings {
        amqp_url: Some(url.into()),
        amqp_exchange: topology.exchange.clone(),
        amqp_queue: topology.queue.clone(),
        amqp_dead_queue: topology.dead_queue.clone(),
        ..Settings::default()
    };
    fill(channel, &topology.dead_queue, letters).await?;

    let take_floor = timed(take_and_return(channel, &topology.dead_queue, letters)).await?;
    let list = timed(command(&settings, dlq::DlqCommand::List { json: true })).await?;
    let publish_floor = timed(publish_windowed(channel, &topology.queue, letters)).await?;
    let replay_all = dlq::DlqCommand::Replay(dlq::ReplayArgs {
        all: true,
        ..dlq::ReplayArgs::default()
    });
    let replay = timed(command(&settings, replay_all)).await?;
    wait_for_ready(channel, &topology.queue, letters).await?;
    wait_for_ready(channel, &topology.dead_queue, 0).await?;

    println!("dead letters: {letters}, all replayed");
    report("list", list, "consume+nack floor", take_floor, letters);
    report(
        "replay --all",
        replay,
        "publish+confirm floor",
        publish_floor,
        letters,
    );
    Ok(())
}

fn report(name: &str, took: Duration, floor_name: &str, floor: Duration, letters: u32) {
    let rate = |duration: Duration| f64::from(letters) / duration.as_secs_f64();
    println!(
        "{name:<14} {:>8.0} letters/s ({:.2} s); {floor_name}: {:>8.0} letters/s; ratio {:.2}",
        rate(took),
        took.as_secs_f64(),
        rate(floor),
        rate(took) / rate(floor)
    );
}

async fn timed<F: Future<Output = anyhow::Result<()>>>(work: F) -> anyhow::Result<Duration> {
    let start = Instant::now();
    work.await?;
    Ok(start.elapsed())
}

async fn command(settings: &Settings, command: dlq::DlqCommand) -> anyhow::Result<()> {
    dlq::run(
        settings,
        command,
        &mut std::io::sink(),
        &mut std::io::sink(),
    )
    .await?;
    Ok(())
}

fn letters_argument() -> anyhow::Result<u32> {
    let mut arguments = std::env::args().skip(1);
    match (arguments.next().as_deref(), arguments.next()) {
        (None, _) => Ok(2000),
        (Some("--letters"), Some(count)) => count.parse().context("--letters takes a number"),
        _ => anyhow::bail!("usage: bench [--letters N]"),
    }
}

/// N dead letters as the worker writes them, published in one pipelined burst.
async fn fill(channel: &Channel, dead_queue: &str, letters: u32) -> anyhow::Result<()> {
    let mut confirms = Vec::new();
    for n in 0..letters {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("svix-id", format!("msg_bench_{n}")),
            ("error", "bench".to_string()),
            ("error-kind", "permanent".to_string()),
        ] {
            headers.insert(
                name.into(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        let properties = BasicProperties::default()
            .with_message_id(format!("msg_bench_{n}").into())
            .with_type("user.created".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = format!(r#"{{"type":"user.created","data":{{"id":"user_{n}"}}}}"#);
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    dead_queue.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a dead letter");
    }
    wait_for_ready(channel, dead_queue, letters).await
}

async fn take_and_return(channel: &Channel, queue: &str, letters: u32) -> anyhow::Result<()> {
    let prefetch = u16::try_from(letters).unwrap_or(0);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut last = None;
    for _ in 0..letters {
        let delivery = consumer.next().await.context("the consumer ended")??;
        last = Some(delivery.delivery_tag);
    }
    channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await?;
    if let Some(last) = last {
        let requeue = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        channel.basic_nack(last, requeue).await?;
    }
    wait_for_ready(channel, queue, letters).await
}

async fn publish_windowed(channel: &Channel, queue: &str, letters: u32) -> anyhow::Result<()> {
    // Published to the worker queue and purged after, so the replay starts from an empty queue.
    let mut sent = 0;
    while sent < letters {
        let mut confirms = Vec::new();
        let end = (sent + WINDOW).min(letters);
        for n in sent..end {
            let body = format!(r#"{{"type":"user.created","data":{{"id":"user_{n}"}}}}"#);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            confirms.push(confirm);
        }
        sent = end;
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a copy");
        }
    }
    channel
        .queue_purge(queue.into(), Default::default())
        .await?;
    Ok(())
}

async fn ready(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let (ready, _) = queue_counts(channel, queue).await?;
    Ok(ready)
}

async fn wait_for_ready(channel: &Channel, queue: &str, expected: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready(channel, queue).await? != expected {
        anyhow::ensure!(Instant::now() < deadline, "{queue} never held {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
