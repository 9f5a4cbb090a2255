// The shopper page: pick or drop a photo, optionally box the item, search, show results and why they matched.
// Plain JS, no build step. Talks to POST /api/search (multipart) and renders its JSON.
(function () {
  "use strict";

  const form = document.getElementById("search-form");
  const input = document.getElementById("image-input");
  const dropZone = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const frame = document.getElementById("preview-frame");
  const previewImage = document.getElementById("preview-image");
  const cropBox = document.getElementById("crop-box");
  const queryLandmarkBox = document.getElementById("query-landmark-box");
  const itemBox = document.getElementById("item-box"); // the best item box the search found, pre-drawn
  const itemChoices = document.getElementById("item-choices"); // one button per item box found
  const searchButton = document.getElementById("search-button");
  const statusLine = document.getElementById("status");
  const errorLine = document.getElementById("error");
  const timingsLine = document.getElementById("timings");
  const querySummary = document.getElementById("query-summary");
  const results = document.getElementById("results");
  const template = document.getElementById("result-template");
  const consent = document.getElementById("consent"); // absent when no shop keeps shoppers' photos
  const confirmMerchants = new Set(JSON.parse(document.getElementById("confirm-merchants").textContent));

  let photo = null; // the File being searched
  let box = null; // [x0, y0, x1, y1] as fractions of the photo, or null for the whole photo

  // --- choosing a photo ------------------------------------------------------------------------------------------
  function usePhoto(file) {
    if (!file) return;
    photo = file;
    box = null;
    cropBox.hidden = true;
    queryLandmarkBox.hidden = true;
    itemBox.hidden = true;
    itemChoices.hidden = true;
    itemChoices.replaceChildren();
    items = [];
    previewImage.src = URL.createObjectURL(file);
    preview.hidden = false;
    searchButton.disabled = false;
    runSearch();
  }

  input.addEventListener("change", () => usePhoto(input.files[0]));
  ["dragenter", "dragover"].forEach((name) =>
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    })
  );
  ["dragleave", "drop"].forEach((name) =>
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.remove("dragging");
    })
  );
  dropZone.addEventListener("drop", (event) => usePhoto(event.dataTransfer.files[0]));

  // --- the optional crop box: drag on the preview ----------------------------------------------------------------
  let dragStart = null;

  function fractionAt(event) {
    const rect = previewImage.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
  }

  function placeBox(element, fractions) {
    const [x0, y0, x1, y1] = fractions;
    element.style.left = x0 * previewImage.clientWidth + "px";
    element.style.top = y0 * previewImage.clientHeight + "px";
    element.style.width = (x1 - x0) * previewImage.clientWidth + "px";
    element.style.height = (y1 - y0) * previewImage.clientHeight + "px";
    element.hidden = false;
  }

  frame.addEventListener("pointerdown", (event) => {
    dragStart = fractionAt(event);
    frame.setPointerCapture(event.pointerId);
  });
  frame.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    const [x, y] = fractionAt(event);
    placeBox(cropBox, [Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x), Math.max(dragStart[1], y)]);
  });
  frame.addEventListener("pointerup", (event) => {
    if (!dragStart) return;
    const [x, y] = fractionAt(event);
    const candidate = [Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x), Math.max(dragStart[1], y)];
    dragStart = null;
    if (candidate[2] - candidate[0] < 0.05 || candidate[3] - candidate[1] < 0.05) {
      return; // a click, not a box
    }
    useBox(candidate);
  });
  document.getElementById("clear-box").addEventListener("click", () => {
    box = null;
    cropBox.hidden = true;
    runSearch();
  });

  function useBox(fractions) {
    box = fractions;
    itemBox.hidden = true;
    placeBox(cropBox, box);
    runSearch();
  }

  // --- the items the search found: the best one pre-drawn, each one a button ------------------------------------
  let items = []; // the item boxes of the photo's last search without a box: the choices stay while one is searched

  function showItems(found) {
    // boxes are fractions of the whole photo (also those found inside a shopper's box, which are not offered)
    if (!box) items = found;
    if (items.length && !box) placeBox(itemBox, items[0].box);
    else itemBox.hidden = true;
    const same = (a, b) => a && b && a.every((v, i) => Math.abs(v - b[i]) < 1e-3);
    const buttons = items.map((item, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "item-choice";
      button.textContent = `Item ${index + 1}`;
      button.title = `search only this item (${item.box.map((v) => v.toFixed(2)).join(", ")})`;
      if (same(box, item.box)) button.classList.add("chosen");
      button.addEventListener("click", () => useBox(item.box.slice()));
      return button;
    });
    const label = document.createElement("span");
    label.textContent = items.length > 1 ? "Items found:" : "Item found:";
    itemChoices.replaceChildren(label, ...buttons);
    itemChoices.hidden = items.length === 0;
  }

  // --- searching -------------------------------------------------------------------------------------------------
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });

  function formData() {
    const data = new FormData();
    data.append("image", photo);
    if (box) data.append("box", box.map((v) => v.toFixed(4)).join(","));
    for (const name of ["category", "merchant", "price_min", "price_max", "attributes", "category_mode", "k"]) {
      const value = form.elements[name].value.trim();
      if (value !== "") data.append(name, value);
    }
    return data;
  }

  function errorText(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && typeof body === "object") {
      return Object.entries(body)
        .map(([field, problems]) => `${field}: ${[].concat(problems).join(" ")}`)
        .join("; ");
    }
    return `the search failed (HTTP ${status})`;
  }

  let generation = 0; // only the latest search may render

  async function runSearch() {
    if (!photo) return;
    const mine = ++generation;
    statusLine.textContent = "Searching…";
    errorLine.hidden = true;
    searchButton.disabled = true;
    try {
      const response = await fetch("/api/search", { method: "POST", body: formData(), headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => null);
      if (mine !== generation) return;
      if (!response.ok) {
        showError(errorText(body, response.status));
        return;
      }
      render(body);
      statusLine.textContent = `${body.results.length} products found`;
    } catch (failure) {
      if (mine === generation) showError(`the search failed: ${failure}`);
    } finally {
      if (mine === generation) searchButton.disabled = false;
    }
  }

  function showError(message) {
    statusLine.textContent = "";
    errorLine.textContent = message;
    errorLine.hidden = false;
    results.replaceChildren();
    timingsLine.textContent = "";
    querySummary.textContent = "";
  }

  // --- rendering -------------------------------------------------------------------------------------------------
  const money = (price) => (price === null ? "" : `€${Number(price).toFixed(2)}`);
  const number = (value, digits) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));

  function render(body) {
    const t = body.timings_ms;
    timingsLine.textContent = ["intake", "encode", "keypoints", "coarse", "fine", "verify", "explain", "total"]
      .filter((stage) => stage in t)
      .map((stage) => `${stage} ${number(t[stage], 1)} ms`)
      .join(" · ");
    const q = body.query;
    showItems(q.item_boxes || []);
    querySummary.textContent =
      (q.category ? `Looks like: ${q.category} (${Math.round((q.category_confidence || 0) * 100)}%). ` : "") +
      (q.item_fused ? "Searched the whole photo and the dashed item together. " : "") +
      `Coarse stage: ${body.coarse.candidates} candidates within Hamming distance ${body.coarse.radius} ` +
      `(${body.coarse.backend}). Model: ${body.model_version.name}.`;
    const queryBox = body.results.length ? body.results[0].explanation.query_landmark_box : null;
    if (queryBox && !box) placeBox(queryLandmarkBox, queryBox);
    else queryLandmarkBox.hidden = true;
    results.replaceChildren(...body.results.map(card));
  }

  function card(hit) {
    const node = template.content.firstElementChild.cloneNode(true);
    const product = hit.product;
    node.dataset.productId = product.id;
    node.dataset.sku = product.sku;
    node.querySelector(".rank").textContent = `#${hit.rank}`;
    const badge = node.querySelector(".match");
    if (hit.match) {
      // the model version's calibrated "same product" probability (null: the version has no calibration)
      badge.textContent = hit.match;
      badge.title = `${Math.round(hit.confidence * 100)}% likely to be the product in your photo`;
      badge.classList.add(hit.match === "exact match" ? "exact" : "similar");
      badge.hidden = false;
    }
    const title = node.querySelector(".title");
    title.textContent = product.title;
    if (product.url) title.href = product.url;
    node.querySelector(".price").textContent = money(product.price);
    node.querySelector(".merchant").textContent = product.merchant;
    const image = node.querySelector(".result-image");
    image.alt = product.title;
    image.src = hit.image_url;
    const landmarkBox = node.querySelector(".landmark-box");
    if (hit.explanation.result_landmark_box) {
      image.addEventListener("load", () => placeOnContainedImage(image, landmarkBox, hit.explanation.result_landmark_box));
    }
    node.querySelector(".why dl").replaceChildren(...why(hit.explanation));
    const confirm = node.querySelector(".confirm");
    if (consent && confirmMerchants.has(product.merchant)) {
      confirm.hidden = false;
      confirm.addEventListener("click", () => confirmResult(confirm, product));
    }
    return node;
  }

  // --- "this is the one": the photo is sent again only with the shopper's consent --------------------------------
  async function confirmResult(button, product) {
    if (!consent.checked) {
      statusLine.textContent = "Tick the box above first: without it, your photo is not kept.";
      return;
    }
    const data = new FormData();
    data.append("image", photo);
    if (box) data.append("box", box.map((v) => v.toFixed(4)).join(","));
    data.append("product", product.id);
    data.append("consent", "true");
    button.disabled = true;
    try {
      const response = await fetch("/api/search/confirm", { method: "POST", body: data, headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => null);
      statusLine.textContent = response.ok ? body.detail : errorText(body, response.status);
      if (response.ok) button.textContent = "Thank you";
      else button.disabled = false;
    } catch (failure) {
      statusLine.textContent = `could not send: ${failure}`;
      button.disabled = false;
    }
  }

  function placeOnContainedImage(image, element, fractions) {
    // The thumbnail is letterboxed (object-fit: contain): find where the picture actually sits.
    const scale = Math.min(image.clientWidth / image.naturalWidth, image.clientHeight / image.naturalHeight);
    const width = image.naturalWidth * scale;
    const height = image.naturalHeight * scale;
    const left = (image.clientWidth - width) / 2;
    const top = (image.clientHeight - height) / 2;
    const [x0, y0, x1, y1] = fractions;
    element.style.left = left + x0 * width + "px";
    element.style.top = top + y0 * height + "px";
    element.style.width = (x1 - x0) * width + "px";
    element.style.height = (y1 - y0) * height + "px";
    element.hidden = false;
  }

  function why(e) {
    const rows = [
      ["Hamming distance", `${e.hamming_distance} of ${e.code_bits} bits`],
      ["fc7 distance", number(e.fc7_distance, 4)],
      [
        "Geometry",
        e.inliers === null || e.inliers === undefined
          ? "not verified"
          : `${e.inliers} matching points in a consistent layout (of ${e.tentative_matches} matches): ` +
            `score ${number(e.fine_score, 4)} × ${number(e.verify_factor, 2)}`,
        e.inliers >= 8 ? "agree" : "",
      ],
      [
        "Category",
        e.category_predicted
          ? `${e.category_agrees ? "✓" : "✗"} looks like ${e.category_predicted}, listed as ${e.category_catalog || "–"}`
          : `listed as ${e.category_catalog || "–"}`,
        e.category_agrees === null ? "" : e.category_agrees ? "agree" : "disagree",
      ],
      [
        "Attributes",
        Object.keys(e.attributes_predicted).length
          ? `agree on ${e.attributes_agreeing.join(", ") || "none"} (predicted ${Object.keys(e.attributes_predicted).join(", ")})`
          : `listed: ${e.attributes_catalog.join(", ") || "–"}`,
      ],
      [
        "Landmarks",
        e.result_landmark_box
          ? `item box ${e.result_landmark_box.map((v) => v.toFixed(2)).join(", ")} (dashed)`
          : "not predicted by this model",
      ],
    ];
    return rows.flatMap(([label, text, css]) => {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = text;
      if (css) dd.className = css;
      return [dt, dd];
    });
  }
})();
