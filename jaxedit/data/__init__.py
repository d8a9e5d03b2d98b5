"""Built-in datasets: sports facts (athlete -> sport) with their prompt formats and splits."""
