//! `cargo run -p my-algorithm`: train the example algorithm and print its average accuracy.

fn main() -> anyhow::Result<()> {
    let m = my_algorithm::run_example("{ name: l2-anchor, lambda: 0.01 }")?;
    println!(
        "l2-anchor on fmnist-mini (task-IL): average accuracy {:.2}%",
        m.metrics_after(5).avg_acc * 100.0
    );
    Ok(())
}
