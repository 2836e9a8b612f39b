//! `nip recipe new <name>`: starts a recipe from a commented template in ./recipes.
use anyhow::Result;
use clap::{Args, Subcommand};

// `///` comments on the variants and fields are their `--help` text.
#[derive(Subcommand)]
pub enum RecipeCommand {
    /// Write a commented recipe template to ./recipes/<name>.toml (never overwrites a file)
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// Package name: letters, digits, '.', '_' and '-'
    name: String,
}

pub fn run(cmd: &RecipeCommand) -> Result<()> {
    match cmd {
        RecipeCommand::New(args) => {
            // Relative to the current directory: the first place `nip build` looks.
            let path =
                nip_client::recipe::write_template(std::path::Path::new("recipes"), &args.name)?;
            let shown = std::path::Path::new(".").join(&path);
            println!("✅ Wrote a recipe template to {}", shown.display());
            println!(
                "   Edit its build command, then run `nip build {}`.",
                args.name
            );
            Ok(())
        }
    }
}
