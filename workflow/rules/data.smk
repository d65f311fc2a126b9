rule download:
    input:
        STUDY.local_source(),
    output:
        # The data itself (STUDY.raw_data_path()) is not an output: Snakemake would
        # delete it before a re-run that may fail offline. The job replaces it only
        # once the new copy is complete and verified.
        provenance="data/raw/provenance.json",
    log:
        "logs/download.log",
    conda:
        "../envs/data.yaml"
    params:
        data=STUDY.raw_data_path(),
        source=config["data_source"],
        sha256=config["data_sha256"],
        timeout=config["download_timeout"],
        retries=config["download_retries"],
    script:
        "../scripts/download.py"


rule prepare:
    input:
        "data/raw/provenance.json",
    output:
        train="data/processed/train.tsv",
        validation="data/processed/validation.tsv",
        test="data/processed/test.tsv",
        ids="data/processed/split_ids.json",
    log:
        "logs/prepare.log",
    conda:
        "../envs/data.yaml"
    params:
        data=STUDY.raw_data_path(),
        validation_size=config["validation_size"],
        validation_seed=config["validation_seed"],
    script:
        "../scripts/prepare.py"


rule sample:
    input:
        train="data/processed/train.tsv",
        test=f"data/processed/{config['evaluation_split']}.tsv",
    output:
        sample="data/processed/test_sample.tsv",
        distribution="results/data/class_distribution.tsv",
    log:
        "logs/sample.log",
    conda:
        "../envs/data.yaml"
    params:
        size=config["sample_size"],
        scheme=config["sample_scheme"],
        seed=config["sample_seed"],
    script:
        "../scripts/sample.py"
