# Prompt families (config prompt_variants): every variant of a strategy's prompt scored
# in one job, one chosen on the validation sample alone, its test predictions written as
# the strategy's row, and the spread over all variants reported.


rule validation_sample:
    input:
        validation="data/processed/validation.tsv",
        sample="data/processed/test_sample.tsv",
    output:
        "data/processed/validation_sample.tsv",
    log:
        "logs/validation_sample.log",
    conda:
        "../envs/data.yaml"
    params:
        size=config["prompt_variants"]["validation_size"],
        seed=config["prompt_variants"]["seed"],
    script:
        "../scripts/validation_sample.py"


rule predict_family:
    input:
        unpack(lambda w: STUDY.family_inputs(w.model, w.strategy)),
    output:
        validation=VARIANT_FILES["validation"],
        test=VARIANT_FILES["test"],
        record=VARIANT_FILES["record"],
    log:
        "logs/predict_family/{model}/{strategy}.log",
    benchmark:
        "results/benchmarks/predict_family/{model}/{strategy}.tsv"
    wildcard_constraints:
        strategy=STUDY.family_pattern(),
    conda:
        "../envs/llm.yaml"
    threads: all_cores()
    resources:
        gpu=1,
    params:
        entry=model_entry,
        settings=lambda w: STUDY.family_settings(w.model, w.strategy),
    script:
        "../scripts/predict_family.py"


rule choose_variant:
    # The validation predictions alone: the choice never reads the test split's.
    input:
        validation=VARIANT_FILES["validation"],
        record=VARIANT_FILES["record"],
    output:
        VARIANT_FILES["choice"],
    log:
        "logs/choose_variant/{model}/{strategy}.log",
    wildcard_constraints:
        strategy=STUDY.family_pattern(),
    conda:
        "../envs/report.yaml"
    params:
        statistics=config["statistics"],
    script:
        "../scripts/choose_variant.py"


rule chosen_variant:
    input:
        choice=VARIANT_FILES["choice"],
        test=VARIANT_FILES["test"],
        record=VARIANT_FILES["record"],
    output:
        tsv="results/predictions/{model}/{strategy}.tsv",
        json="results/predictions/{model}/{strategy}.json",
    log:
        "logs/chosen_variant/{model}/{strategy}.log",
    wildcard_constraints:
        strategy=STUDY.family_pattern(),
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/chosen_variant.py"


ruleorder: chosen_variant > predict


rule prompt_sensitivity:
    input:
        unpack(lambda w: STUDY.sensitivity_inputs()),
    output:
        md=report(
            SENSITIVITY_OUTPUTS[0],
            caption="../report/prompt_sensitivity.rst",
            category="Results",
            labels={"table": "prompt sensitivity (Markdown)"},
        ),
        csv=report(
            SENSITIVITY_OUTPUTS[1],
            caption="../report/prompt_sensitivity.rst",
            category="Results",
            labels={"table": "prompt sensitivity (CSV)"},
        ),
        figure=report(
            SENSITIVITY_OUTPUTS[2],
            caption="../report/prompt_sensitivity.rst",
            category="Results",
            labels={"figure": "prompt sensitivity"},
        ),
    log:
        "logs/prompt_sensitivity/prompt_sensitivity.log",
    conda:
        "../envs/report.yaml"
    params:
        pairs=STUDY.family_pairs(),
    script:
        "../scripts/prompt_sensitivity.py"
