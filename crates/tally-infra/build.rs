//! `sqlx::migrate!` embeds the migrations at compile time, and cargo does not know it reads
//! them: without this, a new migration file leaves a binary that never applies it.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
