//! powermeterd: electricity meter pulse counter daemon (work in progress).
fn main() {
    println!("powermeterd {}", env!("CARGO_PKG_VERSION"));
}
